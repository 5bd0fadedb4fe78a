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

from llmprune.config import CalibConfig, Recipe, RecoveryConfig, RuntimeConfig, SaveConfig, build
from llmprune.errors import ConfigError
from llmprune.prune.registry import get_method
from llmprune.recipe_files import available_recipes, find_recipe

_TOP_KEYS = ("prune", "calibration", "save", "runtime", "recover")


def stage_from_dict(data: Any, where: str):
    """One prune stage: ``{"method": name, **config fields}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'method' key")
    if "method" not in data:
        raise ConfigError(f"{where}.method: missing (every prune stage names its method)")
    body = dict(data)
    name = body.pop("method")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.method: expected a method name, got {_shown(name)}")
    try:
        method = get_method(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}.method: {exc}") from None
    sparsity = body.get("sparsity")
    if "sparsity" in body and (isinstance(sparsity, bool) or not isinstance(sparsity, (str, int, float))):
        raise ConfigError(f"{where}.sparsity: expected N:M (quoted, e.g. \"2:4\") or a ratio such as 0.5, "
                          f"got {_shown(sparsity)}")
    return build(method.config_cls, body, where)


def _shown(value: Any) -> str:
    """``value`` for a message: its repr, with the YAML type named for containers."""
    kind = {list: "a list", dict: "a mapping"}.get(type(value))
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{kind} {text}" if kind else text


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from parsed YAML/JSON."""
    if not isinstance(data, dict):
        got = "the file is empty" if data is None else f"got {_shown(data) if isinstance(data, (list, dict)) else type(data).__name__}"
        raise ConfigError(f"{source}: a recipe must be a mapping with keys {', '.join(_TOP_KEYS)} ({got})")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown key (expected one of: {', '.join(_TOP_KEYS)})")
    stages_raw = data.get("prune") or []
    if not isinstance(stages_raw, list):
        raise ConfigError(f"{source}: prune: expected a list of stages")
    try:
        stages = [stage_from_dict(s, f"prune[{i}]") for i, s in enumerate(stages_raw)]
        return Recipe(
            stages=stages,
            calibration=build(CalibConfig, data.get("calibration"), "calibration"),
            save=build(SaveConfig, data.get("save"), "save"),
            runtime=build(RuntimeConfig, data.get("runtime"), "runtime"),
            recover=build(RecoveryConfig, data["recover"], "recover") if data.get("recover") is not None else None,
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file, or a shipped recipe by name (``wanda-2of4``: ``llmprune recipes``)."""
    given = path
    path = Path(path).expanduser()
    if not path.exists() and find_recipe(given) is not None:  # a file of that name would win
        path = find_recipe(given)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory, not a YAML file")
    if not path.is_file():
        names = ", ".join(available_recipes())
        raise ConfigError(f"recipe file not found: {path} (shipped recipes, usable by name: {names})")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"recipe {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not a UTF-8 text file (byte {exc.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: invalid YAML ({_yaml_problem(exc)})") from None
    except RecursionError:
        raise ConfigError(f"recipe {path}: invalid YAML (nested too deeply)") from None
    return recipe_from_dict(data, source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``<problem> at line L, column C`` from a PyYAML error (its first line when it has no position)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
