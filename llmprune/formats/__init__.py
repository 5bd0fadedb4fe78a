"""On-disk formats: the checkpoint registry with atomic saves, metadata, and the byte layouts (2:4, bitmap)."""
