"""YAML recipes, validated strictly: unknown keys and bad values name the key.

Example (``recipes/wanda-2of4.yaml``)::

    prune:
      - method: wanda
        sparsity: "2:4"      # quote N:M: YAML reads 2:4 as the integer 124
    calibration:
      source: auto
      nsamples: 128
      seqlen: 2048
    save:
      format: dense
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmprune.config import CalibConfig, Recipe, RuntimeConfig, SaveConfig, build
from llmprune.errors import ConfigError
from llmprune.prune.registry import get_method

_TOP_KEYS = ("prune", "calibration", "save", "runtime")


def stage_from_dict(data: Any, where: str):
    """One prune stage: ``{"method": name, **config fields}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'method' key")
    if "method" not in data:
        raise ConfigError(f"{where}.method: missing (every prune stage names its method)")
    body = dict(data)
    name = body.pop("method")
    try:
        method = get_method(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}.method: {exc}") from None
    return build(method.config_cls, body, where)


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from parsed YAML/JSON."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown key (expected one of: {', '.join(_TOP_KEYS)})")
    stages_raw = data.get("prune") or []
    if not isinstance(stages_raw, list):
        raise ConfigError(f"{source}: prune: expected a list of stages")
    stages = [stage_from_dict(s, f"prune[{i}]") for i, s in enumerate(stages_raw)]
    try:
        return Recipe(
            stages=stages,
            calibration=build(CalibConfig, data.get("calibration"), "calibration"),
            save=build(SaveConfig, data.get("save"), "save"),
            runtime=build(RuntimeConfig, data.get("runtime"), "runtime"),
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return recipe_from_dict(data, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
