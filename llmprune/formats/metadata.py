"""The checkpoint metadata (``llmprune.json``): what was pruned, how, and with which result.

Built here for every compress path (in memory and streaming), so both record the same keys.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import torch

from llmprune._version import __version__
from llmprune.config import CalibConfig, Recipe


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

    Returns:
        A JSON-serialisable dict: ``llmprune_version``, ``base_model``, ``recipe``, ``calibration``,
        ``sparsity`` (``overall``, ``modules``), ``prune_seconds``, ``dtype``, ``command`` and, when given,
        ``format`` and ``engine``.
    """
    metadata = {
        "llmprune_version": __version__,
        "base_model": str(base_model),
        "recipe": recipe.to_dict(),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "sparsity": {
            "overall": round(report.overall_sparsity, 6),
            "modules": {m.name: round(m.sparsity, 6) for m in report.modules},
        },
        "prune_seconds": round(report.seconds, 2),
        "dtype": str(dtype).replace("torch.", ""),
        "command": command or " ".join(sys.argv),
    }
    if format is not None:
        metadata["format"] = format
    if engine is not None:
        metadata["engine"] = engine
    return metadata
