"""Error types shared by the library and the CLI."""

from __future__ import annotations


class LlmpruneError(Exception):
    """A problem with the user's input (model path, flags, recipe, data).

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    """


class ConfigError(LlmpruneError, ValueError):
    """Invalid configuration value or recipe key."""
