"""CLI subcommands, one module each (see :mod:`llmprune.cli`)."""
