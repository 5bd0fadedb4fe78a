"""The in-memory layer-by-layer loop: every decoder layer calibrated, pruned and re-run in turn.

The SparseGPT/Wanda protocol, with only one decoder layer on the device at a time so a model larger than
device memory can be pruned: the inputs of layer 0 are captured (:mod:`llmprune.calibration.capture`); for each
layer, it is moved to the device and pruned by :func:`llmprune.engine.step.prune_layer` (statistics from the
calibration batches, then the method), and the batches are run again so the *pruned* outputs become the next
layer's inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import LayerInputs, run_layer
from llmprune.calibration.distributed import Reduction
from llmprune.calibration.stats import Accumulators
from llmprune.config import PruneConfig
from llmprune.engine.step import prune_layer
from llmprune.model.access import decoder_layers, decoder_layers_path
from llmprune.model.device import module_device
from llmprune.prune.registry import Method
from llmprune.prune.report import ModuleReport

log = logging.getLogger(__name__)


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    method: Method,
    config: PruneConfig,
    inputs: LayerInputs | None,
    *,
    device: torch.device,
    ignore: Callable[[str], bool],
    progress: bool = True,
    reduce: Callable[[Accumulators], None] | None = None,
) -> list[ModuleReport]:
    """Prune every linear of every decoder layer with a ``"linear"`` method.

    Args:
        model: the causal LM (modified in place).
        method: :class:`llmprune.prune.registry.Method` of kind ``"linear"``.
        config: its config.
        inputs: captured layer-0 inputs (``[b, s, hidden]`` per batch), or None for data-free methods.
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
    reduction = Reduction(finish=reduce) if reduce is not None else None
    n_batches = len(inputs) if inputs is not None else 0
    reports: list[ModuleReport] = []
    bar = tqdm(range(len(layers)), desc=f"{method.name} {config.sparsity}", unit="layer", disable=not progress)
    for idx in bar:
        layer = layers[idx]
        home = module_device(layer)
        layer.to(device)
        batches = [partial(run_layer, layer, inputs, b) for b in range(n_batches)]
        reports.extend(prune_layer(layer, idx, prefix, method, config, batches, device=device, ignore=ignore,
                                   reduce=reduction))
        if idx + 1 < len(layers):
            for b in range(n_batches):
                inputs.hidden[b] = run_layer(layer, inputs, b)
        layer.to(home)
    return reports
