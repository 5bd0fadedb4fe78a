"""Publishing: model cards and Hub upload."""
