"""The per-layer step: calibrate -> method -> apply, for one decoder layer already on its device.

Both loops, in memory (:mod:`llmprune.engine.layerwise`) and streaming (:mod:`llmprune.engine.streaming`), call
:func:`prune_layer` once per decoder layer; they differ only in where the layer's weights and calibration
activations come from and where the pruned layer goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from llmprune.calibration.collect import collect
from llmprune.calibration.distributed import Reduction
from llmprune.calibration.stats import Accumulators, make_accumulator
from llmprune.config import PruneConfig
from llmprune.model.access import linear_modules
from llmprune.prune.registry import Method
from llmprune.prune.report import ModuleReport


def new_accumulators(method: Method, targets: Mapping[str, nn.Linear], device: torch.device) -> Accumulators:
    """Empty ``{module name: {statistic: accumulator}}`` for every statistic ``method`` needs."""
    return {name: {s: make_accumulator(s, mod, device) for s in method.stats} for name, mod in targets.items()}


def apply_method(
    method: Method,
    config: PruneConfig,
    targets: Mapping[str, nn.Linear],
    stats: Accumulators,
    prefix: str,
    idx: int,
    stat_seconds: float,
) -> list[ModuleReport]:
    """Prune each target linear of decoder layer ``idx`` in place from its finished statistics.

    Args:
        method: the ``"linear"`` method; ``method.fn(weight [out, in], {statistic: result}, config)`` returns
            the new weight and its keep-mask (both ``[out, in]``).
        config: the method's config.
        targets: ``{name in the layer: linear}`` to prune.
        stats: the accumulated statistics of the targets (empty for data-free methods).
        prefix: the decoder layers' module path (e.g. ``model.layers``), for the reported names.
        idx: the decoder layer's index.
        stat_seconds: the layer's statistics pass, shared evenly across the targets' reported times.

    Returns:
        One :class:`ModuleReport` per target.
    """
    reports = []
    for name, mod in targets.items():
        t1 = time.perf_counter()
        results = {s: acc.result() for s, acc in stats.get(name, {}).items()}
        new_weight, mask = method.fn(mod.weight.data, results, config)
        mod.weight.data.copy_(new_weight)
        sparsity = 1.0 - float(mask.sum().item()) / mask.numel()
        secs = time.perf_counter() - t1 + stat_seconds / max(len(targets), 1)
        reports.append(ModuleReport(f"{prefix}.{idx}.{name}", idx, tuple(mod.weight.shape), sparsity, secs, method.name))
    return reports


def _no_batch() -> None:
    """An empty batch position (a process with fewer batches than the ``exact`` reduction's rounds)."""


@torch.no_grad()
def prune_layer(
    layer: nn.Module,
    idx: int,
    prefix: str,
    method: Method,
    config: PruneConfig,
    batches: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    ignore: Callable[[str], bool],
    reduce: Reduction | None = None,
) -> list[ModuleReport]:
    """Calibrate, then prune every linear of one decoder layer in place.

    Args:
        layer: decoder layer ``idx``, on ``device``.
        idx: its index.
        prefix: the decoder layers' module path (``model.layers``); ``f"{prefix}.{idx}.{name}"`` is a linear's
            full name.
        method: :class:`~llmprune.prune.registry.Method` of kind ``"linear"``.
        config: its config.
        batches: one callable per calibration batch of this process, each running ``layer`` on the batch's
            ``[b, s, hidden]`` inputs (the statistics hooks see the linears' inputs); unused by data-free
            methods.
        device: where the statistics live.
        ignore: predicate on full module names; True = leave dense.
        reduce: how this process's statistics are combined with other processes' before any mask is
            computed (:func:`llmprune.calibration.distributed.make_reduction`); None: used as they are.

    Returns:
        One :class:`ModuleReport` per pruned linear.
    """
    targets = {name: mod for name, mod in linear_modules(layer).items() if not ignore(f"{prefix}.{idx}.{name}")}
    stats: Accumulators = {}
    t0 = time.perf_counter()
    if method.stats:
        stats = new_accumulators(method, targets, device)
        exchange = reduce.exchange if reduce is not None else None
        fresh = on_batch = None
        if exchange is not None:  # every batch feeds its own accumulators, merged in by the exchange
            batches = [*batches, *[_no_batch] * (reduce.rounds - len(batches))]
            fresh = partial(new_accumulators, method, targets, device)
            on_batch = lambda position, _value, batch_stats: exchange(position, batch_stats, stats)  # noqa: E731
        collect(targets, stats, batches, fresh=fresh, on_batch=on_batch)
        if reduce is not None and reduce.finish is not None:
            reduce.finish(stats)
    return apply_method(method, config, targets, stats, prefix, idx, time.perf_counter() - t0)
