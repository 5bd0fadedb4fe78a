"""Layer-by-layer calibration driver.

The SparseGPT/Wanda protocol, with only one decoder layer on the device at a
time so a model larger than device memory can be pruned:

1. Run the embeddings on the calibration ids and *capture* the inputs of
   decoder layer 0 (hidden states plus the keyword arguments the model passes
   to every layer: attention mask, position ids, rotary ``position_embeddings``,
   ...). A pre-hook raises as soon as layer 0 is entered, so no layer runs.
2. For each layer: move it to the device, run the calibration batches through
   it with hooks feeding statistics accumulators, prune its linears, run the
   batches again so the *pruned* outputs become the next layer's inputs, move
   the layer back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.stats import make_accumulator
from llmprune.modeling import decoder_layers, decoder_layers_path, linear_modules, non_layer_modules

log = logging.getLogger(__name__)


class _Captured(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration inputs of one decoder layer, one entry per batch.

    Attributes:
        hidden: ``[b, s, hidden]`` tensors.
        args: extra positional arguments of each call.
        kwargs: keyword arguments of each call (masks, rotary embeddings, ...).
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Temporarily move modules to ``device``, restoring their devices afterwards."""
    homes = [_module_device(m) for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int = 8
) -> LayerInputs:
    """Inputs of decoder layer 0 for every calibration batch.

    Args:
        model: a causal LM (any device; non-layer modules are moved to ``device``
            for the capture and moved back).
        input_ids: ``[nsamples, seqlen]`` token ids.
        device: where the embeddings run and the captured tensors live.
        batch_size: sequences per forward pass.
    """
    layers = decoder_layers(model)
    captured = LayerInputs()

    def pre_hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        kw["use_cache"] = False
        captured.hidden.append(hidden.detach())
        captured.args.append(rest)
        captured.kwargs.append(kw)
        raise _Captured

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with on_device(non_layer_modules(model) + [layers[0]], device):
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: LayerInputs, index: int) -> torch.Tensor:
    """Output hidden states of ``layer`` for batch ``index`` of ``inputs``."""
    out = layer(inputs.hidden[index], *inputs.args[index], **inputs.kwargs[index])
    return out[0] if isinstance(out, (tuple, list)) else out


def _feed(accumulators: dict) -> Callable:
    def hook(module, args, output):  # must return None: a value would replace the output
        for acc in accumulators.values():
            acc.add(args[0])

    return hook


@dataclass
class ModuleReport:
    """What happened to one linear."""

    name: str
    layer: int
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    method: str


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
        method: :class:`llmprune.registry.Method` of kind ``"linear"``.
        config: its config.
        inputs: captured layer-0 inputs, or None for data-free methods.
        device: where each layer runs.
        ignore: predicate on full module names; True = leave dense.
        progress: show a progress bar over layers.
        reduce: called with ``{module name: {stat name: accumulator}}`` once the layer's local batches are
            accumulated and before any mask is computed; distributed runs all-reduce the accumulators' ``sum``
            tensors and ``count`` here (see :func:`llmprune.distributed.make_reduce`). None: nothing.

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
        home = _module_device(layer)
        layer.to(device)
        targets = {
            name: mod for name, mod in linear_modules(layer).items() if not ignore(f"{prefix}.{idx}.{name}")
        }
        stats: dict[str, dict] = {}
        t0 = time.perf_counter()
        if method.stats:
            stats = {n: {s: make_accumulator(s, m, device) for s in method.stats} for n, m in targets.items()}
            handles = [mod.register_forward_hook(_feed(stats[name])) for name, mod in targets.items()]
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
