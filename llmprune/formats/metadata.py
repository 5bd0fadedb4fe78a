"""The checkpoint metadata (``llmprune.json``): what was pruned, how, and with which result.

Built here for every compress path (in memory and streaming), so both record the same keys.

Privacy and portability: with ``record_paths="relative"`` (the default) no absolute local path is recorded. The
base model, when it is a local directory, the calibration file, a gates directory and every local path of
the recorded command line are written relative to the checkpoint directory (``../tiny-llama``), and the file
says so (``"paths": "relative"``); a Hub id or alias is recorded as given. ``record_paths="absolute"``
records resolved absolute paths instead. Readers get the base model with :func:`resolve_base_model`, which
resolves a relative one against the checkpoint directory, so it works from any working directory.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from llmprune._version import __version__
from llmprune.config import CalibConfig, Recipe
from llmprune.errors import ConfigError, LlmpruneError

#: How local paths are recorded: relative to the checkpoint directory, or absolute.
PATH_MODES = ("relative", "absolute")
#: Command-line flags whose value is always a local path (other values count as paths when they exist).
_PATH_FLAGS = frozenset({"-o", "--output", "--offload-dir", "--recipe", "--json", "--gates", "--data-dir",
                         "--data-path"})


def check_record_paths(mode: str) -> str:
    """``mode`` if it is one of :data:`PATH_MODES`, else a :class:`ConfigError`."""
    if mode not in PATH_MODES:
        raise ConfigError(f"record_paths must be one of {', '.join(PATH_MODES)}, got {mode!r}")
    return mode


def record_path(path: str | os.PathLike, output: str | os.PathLike | None, mode: str = "relative") -> str:
    """A local path as ``llmprune.json`` records it: relative to the checkpoint directory ``output`` (both
    resolved, so it holds through symlinks), or absolute (``mode="absolute"`` or no ``output``)."""
    resolved = Path(path).expanduser().resolve()
    if mode == "absolute" or output is None:
        return str(resolved)
    try:
        return os.path.relpath(resolved, Path(output).expanduser().resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return str(resolved)


def _is_local(value: str) -> bool:
    return bool(value) and (value.startswith(("/", "~")) or Path(value).expanduser().exists())


def portable_command(command: str, output: str | os.PathLike | None, mode: str = "relative") -> str:
    """``command`` with every local path argument recorded by :func:`record_path` (the program by its name).

    A path is an argument that exists, is absolute or home-relative, or follows a flag that takes a path
    (``-o``, ``--offload-dir`` ...); ``--flag=value`` forms are handled too.
    """
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    if not tokens:
        return command
    out = [Path(tokens[0]).name or tokens[0]]
    prev = ""
    for tok in tokens[1:]:
        if tok.startswith("-") and "=" in tok:
            flag, _, value = tok.partition("=")
            if value and (flag in _PATH_FLAGS or _is_local(value)):
                tok = f"{flag}={record_path(value, output, mode)}"
        elif not tok.startswith("-") and (prev in _PATH_FLAGS or _is_local(tok)):
            tok = record_path(tok, output, mode)
        out.append(tok)
        prev = tok if tok.startswith("-") else ""
    return shlex.join(out)


def _local_file_value(value: Any, output, mode: str) -> Any:
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return record_path(value, output, mode)
    return value


def resolve_base_model(checkpoint_dir: str | os.PathLike, metadata: dict) -> str:
    """The base model a checkpoint's ``llmprune.json`` names, usable from any working directory.

    A local path recorded relative (``"paths": "relative"``) is resolved against ``checkpoint_dir``; an absolute
    path, a Hub id or an alias is returned as recorded (so are paths of files written before paths were
    recorded relative).

    Raises:
        LlmpruneError: the metadata names no base model.
    """
    base = metadata.get("base_model") if isinstance(metadata, dict) else None
    if not isinstance(base, str) or not base:
        raise LlmpruneError(f"{Path(checkpoint_dir) / 'llmprune.json'} records no base_model")
    p = Path(base)
    if metadata.get("paths") == "relative" and not p.is_absolute() and not base.startswith("~"):
        candidate = Path(checkpoint_dir).expanduser().resolve() / p
        if base.startswith(".") or candidate.exists():
            return str(candidate.resolve())
    return base


class _Module(Protocol):
    name: str
    sparsity: float


class Report(Protocol):
    """What the metadata reads from a prune report (:class:`llmprune.prune.report.PruneReport`)."""

    modules: Sequence[_Module]
    seconds: float

    @property
    def overall_sparsity(self) -> float: ...


def build_metadata(
    *,
    base_model: str,
    recipe: Recipe,
    calibration: CalibConfig | None,
    report: Report,
    dtype: torch.dtype,
    command: str | None = None,
    format: str | None = None,
    engine: dict | None = None,
    output: str | os.PathLike | None = None,
    record_paths: str = "relative",
    base_is_path: bool | None = None,
) -> dict:
    """The ``llmprune.json`` content of a compressed checkpoint.

    Args:
        base_model: the model reference as given (alias, directory or Hub id).
        recipe: the recipe that ran.
        calibration: the calibration config used (``seqlen`` as clipped), None when no method calibrated.
        report: the prune report (overall and per-module sparsity, wall time).
        dtype: the dtype of the saved weights.
        command: the command line (None: ``sys.argv``).
        format: recorded as ``"format"`` when given (the format actually saved).
        engine: recorded as ``"engine"`` when given (how the streaming engine ran).
        output: the checkpoint directory local paths are recorded relative to (None: paths as given).
        record_paths: ``"relative"`` (to ``output``) or ``"absolute"``; see the module docstring.
        base_is_path: whether ``base_model`` is a local directory (None: when it exists; an alias or Hub id
            is recorded as given).

    Returns:
        A JSON-serialisable dict: ``llmprune_version``, ``base_model``, ``recipe``, ``calibration``,
        ``sparsity`` (``overall``, ``modules``), ``prune_seconds``, ``dtype``, ``command``, ``paths`` (the
        ``record_paths`` mode, when ``output`` is given), ``recovery`` (when the recipe recovered) and, when
        given, ``format`` and ``engine``.
    """
    check_record_paths(record_paths)
    base = str(base_model)
    recipe_d = recipe.to_dict()
    calib_d = calibration.to_dict() if calibration is not None else None
    raw_command = command or shlex.join(sys.argv)
    if output is not None:
        if base_is_path if base_is_path is not None else Path(base).expanduser().exists():
            base = record_path(base, output, record_paths)
        for d in (recipe_d["calibration"], calib_d):
            if d is not None:
                d["source"] = _local_file_value(d["source"], output, record_paths)
        if recipe_d["runtime"].get("gates"):
            recipe_d["runtime"]["gates"] = _local_file_value(recipe_d["runtime"]["gates"], output, record_paths)
        raw_command = portable_command(raw_command, output, record_paths)
    metadata = {
        "llmprune_version": __version__,
        "base_model": base,
        "recipe": recipe_d,
        "calibration": calib_d,
        "sparsity": {
            "overall": round(report.overall_sparsity, 6),
            "modules": {m.name: round(m.sparsity, 6) for m in report.modules},
        },
        "prune_seconds": round(report.seconds, 2),
        "dtype": str(dtype).replace("torch.", ""),
        "command": raw_command,
    }
    if output is not None:
        metadata["paths"] = record_paths
    blocks, e2e = (report.recovery() if hasattr(report, "recovery") else []), getattr(report, "distill", None)
    if blocks or e2e:  # what recovery did (llmprune.recover): losses before/after per block part, or end to end
        metadata["recovery"] = {**({"blocks": blocks} if blocks else {}), **({"e2e": e2e} if e2e else {})}
    if format is not None:
        metadata["format"] = format
    if engine is not None:
        metadata["engine"] = engine
    return metadata
