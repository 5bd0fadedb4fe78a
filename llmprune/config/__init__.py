"""Config dataclasses shared by the Python API, the CLI and YAML recipes.

Every config validates itself in ``__post_init__`` and raises
:class:`~llmprune.errors.ConfigError` naming the bad field.

One module per concern: :mod:`~llmprune.config.base` (validation helpers, :class:`PruneConfig`,
:class:`CalibConfig`, :class:`SaveConfig`), :mod:`~llmprune.config.runtime` (:class:`RuntimeConfig`),
:mod:`~llmprune.config.recovery` (:class:`RecoveryConfig`) and :mod:`~llmprune.config.recipe` (:class:`Recipe`).
"""

from llmprune.config.base import (
    SAVE_DTYPES,
    CalibConfig,
    PruneConfig,
    SaveConfig,
    build,
    check_float,
    check_int,
    check_patterns,
)
from llmprune.config.recipe import Recipe
from llmprune.config.recovery import RecoveryConfig
from llmprune.config.runtime import DEFAULT_KV_WINDOW, RuntimeConfig

__all__ = [
    "DEFAULT_KV_WINDOW", "SAVE_DTYPES", "CalibConfig", "PruneConfig", "Recipe", "RecoveryConfig", "RuntimeConfig",
    "SaveConfig", "build", "check_float", "check_int", "check_patterns",
]
