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

from llmprune.calibration.capture import LayerInputs, capture_layer_inputs, run_layer
from llmprune.calibration.distributed import Reduction
from llmprune.calibration.stats import Accumulators
from llmprune.config import PruneConfig, RecoveryConfig
from llmprune.engine.onepass import prune_layer_one_pass
from llmprune.engine.sequential import uses_one_pass
from llmprune.engine.step import prune_layer
from llmprune.model.access import decoder_layers, decoder_layers_path
from llmprune.model.device import module_device
from llmprune.prune.registry import Method
from llmprune.prune.report import ModuleReport

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype_for(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """float32 for a 16-bit ``dtype`` on the CPU, else None (see :func:`default_compute_dtype`)."""
    return torch.float32 if device.type == "cpu" and dtype in _HALF else None


def default_compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """The dtype the layer loop computes in: float32 for a 16-bit model on the CPU (CPUs run fp32 matmuls
    faster than bf16/fp16 ones, and the statistics are more precise), else None (the model's own dtype).

    Only the layer on the device is upcast, one at a time; the model keeps (and saves in) its own dtype.
    """
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return compute_dtype_for(p.dtype if p is not None else None, device)


def _cast_floats(obj, dtype: torch.dtype):
    """``obj`` (tensors, tuples, lists, dicts of them) with every 16-bit floating tensor cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.dtype in _HALF else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(v, dtype) for v in obj)
    if isinstance(obj, list):
        return [_cast_floats(v, dtype) for v in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def capture_inputs(model: nn.Module, calib: torch.Tensor, device: torch.device, batch_size: int,
                   compute_dtype: torch.dtype | None = None) -> LayerInputs:
    """:func:`~llmprune.calibration.capture.capture_layer_inputs`, with the input embeddings upcast to
    ``compute_dtype`` for the capture (exactly: 16-bit -> fp32), so the hidden states and the rotary tables the
    layers receive are computed in it too; the embeddings are cast back after."""
    emb = model.get_input_embeddings() if compute_dtype is not None else None
    old = _layer_dtype(emb) if emb is not None else None
    if emb is not None and old is not None:
        emb.to(compute_dtype)
    try:
        return capture_layer_inputs(model, calib, device, batch_size)
    finally:
        if emb is not None and old is not None:
            emb.to(old)


def _layer_dtype(layer: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in layer.parameters() if t.is_floating_point()), None)


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
    recover: RecoveryConfig | None = None,
    compute_dtype: torch.dtype | None = None,
    sequential: str = "layer",
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
        recover: block recovery of each pruned layer (:mod:`llmprune.recover`; needs ``inputs``), or None.
        compute_dtype: the dtype each layer (and the activations between layers) is computed in while it is on
            the device, cast back to its own dtype after (:func:`default_compute_dtype`); None: its own dtype.
        sequential: ``"module"``: each layer calibrated and pruned in one pass
            (:func:`~llmprune.engine.onepass.prune_layer_one_pass`, for methods with statistics and without
            block recovery); ``"layer"``: statistics from the dense layer, then a second pass
            (:mod:`llmprune.engine.sequential`).

    Returns:
        One :class:`ModuleReport` per pruned linear.
    """
    if (method.stats or recover is not None) and inputs is None:
        raise ValueError(f"method {method.name!r} needs calibration inputs")
    layers = decoder_layers(model)
    prefix = decoder_layers_path(model)
    reduction = Reduction(finish=reduce) if reduce is not None else None
    n_batches = len(inputs) if inputs is not None else 0
    reports: list[ModuleReport] = []
    if compute_dtype is not None and inputs is not None:
        inputs.hidden = [_cast_floats(h, compute_dtype) for h in inputs.hidden]
        inputs.args = [_cast_floats(a, compute_dtype) for a in inputs.args]
        inputs.kwargs = [_cast_floats(k, compute_dtype) for k in inputs.kwargs]
    one_pass = uses_one_pass(sequential, method, recover)
    bar = tqdm(range(len(layers)), desc=f"{method.name} {config.sparsity}", unit="layer", disable=not progress)
    for idx in bar:
        layer = layers[idx]
        home, home_dtype = module_device(layer), _layer_dtype(layer)
        layer.to(device)
        if compute_dtype is not None:
            layer.to(compute_dtype)
        batches = [partial(run_layer, layer, inputs, b) for b in range(n_batches)]
        if one_pass:
            layer_reports, outputs = prune_layer_one_pass(layer, idx, prefix, method, config, batches,
                                                          device=device, ignore=ignore, reduce=reduction)
            reports.extend(layer_reports)
            inputs.hidden = outputs
        else:
            reports.extend(prune_layer(layer, idx, prefix, method, config, batches, device=device, ignore=ignore,
                                       reduce=reduction, recover=recover, progress=progress))
            if idx + 1 < len(layers):
                for b in range(n_batches):
                    inputs.hidden[b] = run_layer(layer, inputs, b)
        layer.to(home)
        if compute_dtype is not None and home_dtype is not None:
            layer.to(home_dtype)  # saved in the model's own dtype
    return reports
