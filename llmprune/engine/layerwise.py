"""The in-memory layer-by-layer loop: every decoder layer calibrated, pruned and re-run in turn.

The SparseGPT/Wanda protocol, with only one decoder layer on the device at a time so a model larger than
device memory can be pruned: the inputs of layer 0 are captured (:mod:`llmprune.calibration.capture`); for each
layer, it is moved to the device, its linears' statistics are collected from the calibration batches, the
linears are pruned, and the batches are run again so the *pruned* outputs become the next layer's inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import LayerInputs, run_layer
from llmprune.calibration.stats import feed_hook, make_accumulator
from llmprune.model.access import decoder_layers, decoder_layers_path, linear_modules
from llmprune.model.device import module_device
from llmprune.prune.report import ModuleReport

log = logging.getLogger(__name__)


def apply_method(
    method, config, targets: dict[str, nn.Linear], stats: dict[str, dict], prefix: str, idx: int, stat_seconds: float
) -> list[ModuleReport]:
    """Prune each target linear of decoder layer ``idx`` in place from its finished statistics.

    ``stat_seconds`` (the layer's statistics pass) is shared evenly across the targets' reported times.
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


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    method,
    config,
    inputs: LayerInputs | None,
    *,
    device: torch.device,
    ignore: Callable[[str], bool],
    progress: bool = True,
    reduce: Callable[[dict], None] | None = None,
) -> list[ModuleReport]:
    """Prune every linear of every decoder layer with a ``"linear"`` method.

    Args:
        model: the causal LM (modified in place).
        method: :class:`llmprune.prune.registry.Method` of kind ``"linear"``.
        config: its config.
        inputs: captured layer-0 inputs, or None for data-free methods.
        device: where each layer runs.
        ignore: predicate on full module names; True = leave dense.
        progress: show a progress bar over layers.
        reduce: called with ``{module name: {stat name: accumulator}}`` once the layer's local batches are
            accumulated and before any mask is computed; distributed runs all-reduce the accumulators' ``sum``
            tensors and ``count`` here (see :func:`llmprune.calibration.distributed.make_reduce`). None: nothing.

    Returns:
        One :class:`ModuleReport` per pruned linear.
    """
    if method.stats and inputs is None:
        raise ValueError(f"method {method.name!r} needs calibration inputs")
    layers = decoder_layers(model)
    prefix = decoder_layers_path(model)
    reports: list[ModuleReport] = []
    bar = tqdm(range(len(layers)), desc=f"{method.name} {config.sparsity}", unit="layer", disable=not progress)
    for idx in bar:
        layer = layers[idx]
        home = module_device(layer)
        layer.to(device)
        targets = {
            name: mod for name, mod in linear_modules(layer).items() if not ignore(f"{prefix}.{idx}.{name}")
        }
        stats: dict[str, dict] = {}
        t0 = time.perf_counter()
        if method.stats:
            stats = {n: {s: make_accumulator(s, m, device) for s in method.stats} for n, m in targets.items()}
            handles = [mod.register_forward_hook(feed_hook(stats[name])) for name, mod in targets.items()]
            try:
                for b in range(len(inputs)):
                    run_layer(layer, inputs, b)
            finally:
                for h in handles:
                    h.remove()
            if reduce is not None:
                reduce(stats)
        reports.extend(apply_method(method, config, targets, stats, prefix, idx, time.perf_counter() - t0))
        del stats
        if inputs is not None and idx + 1 < len(layers):
            for b in range(len(inputs)):
                inputs.hidden[b] = run_layer(layer, inputs, b)
        layer.to(home)
    return reports
