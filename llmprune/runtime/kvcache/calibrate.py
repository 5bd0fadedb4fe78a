"""``llmprune calibrate-kv``: per-layer, per-head bitmap KV-cache budgets from calibration text.

Two allocations besides ``uniform``: ``entropy`` (UNComp-style; scores from :mod:`llmprune.calibration.entropy`,
keep counts from :mod:`llmprune.runtime.kvcache.budgets`) and ``sensitivity`` (the measured end-to-end cost of
pruning each layer's keys / values, :mod:`llmprune.calibration.kv_sensitivity`, allocated greedily by
:mod:`llmprune.runtime.kvcache.greedy`; K and V share one pool by default). The result is saved as ``kv_budgets.json`` and, in a checkpoint, recorded
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
from llmprune.calibration.kv_sensitivity import kv_sensitivity
from llmprune.config import DEFAULT_KV_WINDOW, CalibConfig, RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.model.device import on_device
from llmprune.model.loading import DEFAULT_MODEL
from llmprune.runtime.calibrate_run import prepare_calibration_run, record_in_checkpoint
from llmprune.runtime.kvcache.budgets import BUDGETS_FILE, make_budgets
from llmprune.runtime.kvcache.greedy import sensitivity_budgets

#: ``allocation`` choices of :func:`calibrate_kv`.
ALLOCATIONS = ("entropy", "sensitivity", "uniform")

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
    per: str | None = None,
    power: float = 1.0,
    joint: bool = True,
    keeps: list[int] | None = None,
    window: int = DEFAULT_KV_WINDOW,
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

    With ``allocation="sensitivity"`` the scores are the measured KL cost of pruning each layer's (``per="layer"``,
    the default there) or KV head's keys / values alone at a few keep counts through the chunked cache of
    ``window`` dense tokens, and the counts minimise the summed cost greedily; ``joint`` (default) lets K and V
    trade entries under one K+V total (the recorded K / V sparsities are then the allocation's own means, whose
    average is the requested one), ``power`` is unused and the bounds default to [0, the smallest measured
    keep count's sparsity]; ``keeps`` are the keep counts measured (default
    :func:`llmprune.calibration.kv_sensitivity.keep_grid`, 8 points at ``head_dim`` 64). ``per`` defaults to
    ``"head"`` for ``entropy``.

    Raises:
        ConfigError: on bad sparsities/bounds/allocation, or no output for a model that is not a checkpoint.
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    per = per or ("layer" if allocation == "sensitivity" else "head")
    k = k_sparsity if k_sparsity is not None else kv_sparsity
    v = v_sparsity if v_sparsity is not None else kv_sparsity
    if k is None or v is None:
        raise ConfigError("calibrate-kv needs --kv-sparsity (or both --k-sparsity and --v-sparsity)")
    RuntimeConfig(kv_k_sparsity=k, kv_v_sparsity=v)  # validated as at run time
    make_kw = dict(per=per, power=power, min_sparsity=min_sparsity, max_sparsity=max_sparsity)
    if allocation == "sensitivity":  # bounds checked before loading anything
        if per not in ("head", "layer"):
            raise ConfigError(f"--per must be 'head' or 'layer', got {per!r}")
        if keeps is not None and (not keeps or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                   for x in keeps)):
            raise ConfigError(f"--sens-keeps must be keep counts >= 1, got {keeps}")
        sensitivity_budgets([[[1.0]]], [[[1.0]]], [1], 64, 1, k, v, joint=joint, min_sparsity=min_sparsity,
                            max_sparsity=0.95 if max_sparsity is None else max_sparsity)
    else:
        for s in (k, v):  # bounds and mapping checked before loading anything
            make_budgets([[1.0]], [[1.0]], 64, s, s, **make_kw)
    run = prepare_calibration_run(model_ref, output, "the budgets", calibration, device, dtype, trust_remote_code,
                                  progress)
    out_dir, cal = run.out_dir, run.calibration
    t0 = time.perf_counter()
    if allocation == "sensitivity":
        with on_device([run.model], run.device):  # every pass runs the whole model
            try:
                sens = kv_sensitivity(run.model, run.ids, run.device, keeps=keeps, per=per, window=window,
                                      batch_size=1, progress=progress)
            except ValueError as exc:  # keep counts not below the model's head_dim
                raise ConfigError(f"--sens-keeps: {exc}") from exc
        log.info("kv sensitivity: %d layers in %.1fs", len(sens.k), sens.seconds)
        budgets = sensitivity_budgets(sens.k, sens.v, sens.keeps, sens.head_dim, sens.heads, k, v, joint=joint,
                                      min_sparsity=min_sparsity, max_sparsity=max_sparsity,
                                      info={"sensitivity": sens.to_dict(), "calibration": cal.to_dict(),
                                            "model": str(model_ref or DEFAULT_MODEL)})
        return _save(out_dir, budgets, {"per": per, "joint": joint, "window": window}, cal)
    scores = kv_entropy_scores(run.model, run.ids, run.device, batch_size=cal.batch_size, progress=progress)
    log.info("kv entropy scores: %d layers x %d heads in %.1fs", len(scores.k), len(scores.k[0]),
             time.perf_counter() - t0)
    budgets = make_budgets(scores.k, scores.v, scores.head_dim, k, v, allocation=allocation,
                           layers=len(scores.k), heads=len(scores.k[0]),
                           info={"scores": scores.to_dict(), "calibration": cal.to_dict(),
                                 "model": str(model_ref or DEFAULT_MODEL)},
                           **(make_kw if allocation == "entropy" else {}))
    return _save(out_dir, budgets, {"per": per, "power": power}, cal)


def _save(out_dir: Path, budgets: Any, mapping: dict, cal: CalibConfig) -> KVCalibrationResult:
    """Write ``kv_budgets.json``; record it (and the budgets' K / V means) in a checkpoint's ``llmprune.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = budgets.save(out_dir / BUDGETS_FILE)
    k, v = budgets.k_sparsity, budgets.v_sparsity
    recorded = record_in_checkpoint(
        out_dir, RuntimeConfig.KV_FIELDS, dict(kv_k_sparsity=k, kv_v_sparsity=v, kv_allocation=BUDGETS_FILE),
        "kv_budgets", {"file": BUDGETS_FILE, "allocation": budgets.allocation, "k_sparsity": k, "v_sparsity": v,
                       **mapping, "calibration": {"source": cal.source, "nsamples": cal.nsamples, "seqlen": cal.seqlen}})
    return KVCalibrationResult(path, budgets, recorded)
