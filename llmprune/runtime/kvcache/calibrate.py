"""``llmprune calibrate-kv``: per-layer, per-head bitmap KV-cache budgets from calibration entropies (UNComp-style).

Scores come from :mod:`llmprune.calibration.entropy`, the integer keep counts from
:mod:`llmprune.runtime.kvcache.budgets`; the result is saved as ``kv_budgets.json`` and, in a checkpoint, recorded
in ``llmprune.json`` so the runtime options pick it up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmprune.calibration.entropy import kv_entropy_scores
from llmprune.config import CalibConfig, RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.model.loading import DEFAULT_MODEL
from llmprune.runtime.calibrate_run import prepare_calibration_run, record_in_checkpoint
from llmprune.runtime.kvcache.budgets import BUDGETS_FILE, make_budgets

log = logging.getLogger(__name__)


@dataclass
class KVCalibrationResult:
    """What :func:`calibrate_kv` wrote: the budgets file, the budgets, and the checkpoint metadata it updated."""

    path: Path
    budgets: Any
    recorded_in: Path | None = None


def calibrate_kv(
    model_ref: str | None,
    kv_sparsity: float | None = 0.7,
    output: str | Path | None = None,
    *,
    k_sparsity: float | None = None,
    v_sparsity: float | None = None,
    allocation: str = "entropy",
    calibration: CalibConfig | None = None,
    per: str = "head",
    power: float = 1.0,
    min_sparsity: float | None = None,
    max_sparsity: float | None = None,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> KVCalibrationResult:
    """Per-layer, per-KV-head bitmap KV-cache budgets from calibration entropies (UNComp-style), saved as JSON.

    Computes the matrix entropy of every layer's keys (pre-RoPE) and values per KV head on calibration text
    (:func:`llmprune.calibration.entropy.kv_entropy_scores`, one decoder layer on ``device`` at a time), turns
    them into integer keep counts whose totals equal the uniform ``k_sparsity`` / ``v_sparsity`` exactly
    (:func:`llmprune.runtime.kvcache.budgets.make_budgets`) and writes ``kv_budgets.json`` into ``output``
    (default: ``model_ref`` when it is a checkpoint directory). When the output is a checkpoint directory its
    ``llmprune.json`` records the budgets (``recipe.runtime.kv_allocation``, K/V sparsities) so ``generate``,
    ``ppl``, ``eval`` and ``bench`` pick them up.

    Raises:
        ConfigError: on bad sparsities/bounds/allocation, or no output for a model that is not a checkpoint.
    """
    if allocation not in ("entropy", "uniform"):
        raise ConfigError(f"--allocation must be 'entropy' or 'uniform', got {allocation!r}")
    k = k_sparsity if k_sparsity is not None else kv_sparsity
    v = v_sparsity if v_sparsity is not None else kv_sparsity
    if k is None or v is None:
        raise ConfigError("calibrate-kv needs --kv-sparsity (or both --k-sparsity and --v-sparsity)")
    RuntimeConfig(kv_k_sparsity=k, kv_v_sparsity=v)  # validated as at run time
    make_kw = dict(per=per, power=power, min_sparsity=min_sparsity, max_sparsity=max_sparsity)
    for s in (k, v):  # bounds and mapping checked before loading anything
        make_budgets([[1.0]], [[1.0]], 64, s, s, **make_kw)
    run = prepare_calibration_run(model_ref, output, "the budgets", calibration, device, dtype, trust_remote_code,
                                  progress)
    out_dir, cal = run.out_dir, run.calibration
    t0 = time.perf_counter()
    scores = kv_entropy_scores(run.model, run.ids, run.device, batch_size=cal.batch_size, progress=progress)
    log.info("kv entropy scores: %d layers x %d heads in %.1fs", len(scores.k), len(scores.k[0]),
             time.perf_counter() - t0)
    budgets = make_budgets(scores.k, scores.v, scores.head_dim, k, v, allocation=allocation,
                           layers=len(scores.k), heads=len(scores.k[0]),
                           info={"scores": scores.to_dict(), "calibration": cal.to_dict(),
                                 "model": str(model_ref or DEFAULT_MODEL)},
                           **(make_kw if allocation == "entropy" else {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = budgets.save(out_dir / BUDGETS_FILE)
    recorded = record_in_checkpoint(
        out_dir, RuntimeConfig.KV_FIELDS, dict(kv_k_sparsity=float(k), kv_v_sparsity=float(v), kv_allocation=BUDGETS_FILE),
        "kv_budgets", {"file": BUDGETS_FILE, "allocation": allocation, "k_sparsity": float(k), "v_sparsity": float(v),
                       "per": per, "power": power,
                       "calibration": {"source": cal.source, "nsamples": cal.nsamples, "seqlen": cal.seqlen}})
    return KVCalibrationResult(path, budgets, recorded)
