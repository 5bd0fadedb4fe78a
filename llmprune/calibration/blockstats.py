"""Per-block calibration statistics for structured pruning (CFSP's coarse and fine signals).

One layer-by-layer pass of the unpruned model (one decoder layer on the device at a time, statistics
collected by :func:`llmprune.calibration.collect.collect` as for the unstructured methods) gives, per
decoder layer:

* ``importance``: mean angular distance ``arccos(cos(x_in, x_out)) / pi`` between the
  layer's input and output hidden states (coarse, between blocks);
* mean squared inputs of the MLP (``mlp_x``), of ``down_proj`` (``mlp_h``) and, for head
  pruning, of the attention (``attn_x``) and of ``o_proj`` (``attn_o``) (fine, inside a block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import LayerInputs, capture_layer_inputs, run_layer
from llmprune.calibration.collect import collect
from llmprune.calibration.stats import ActSqNorm
from llmprune.model.access import attn_of, decoder_layers, mlp_of
from llmprune.model.device import module_device


def angular_distance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token ``arccos(cos(x_in, x_out)) / pi`` in [0, 1]; inputs ``[..., hidden]``."""
    cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@dataclass
class LayerStats:
    """Statistics of one decoder layer; tensors are per-channel means of squared inputs (fp32, CPU)."""

    importance: float
    mlp_x: torch.Tensor
    mlp_h: torch.Tensor
    attn_x: torch.Tensor | None = None
    attn_o: torch.Tensor | None = None


@torch.no_grad()
def collect_stats(
    model: nn.Module, calib: torch.Tensor, device: torch.device, batch_size: int, heads: bool, progress: bool
) -> list[LayerStats]:
    """One layer-by-layer pass of the (unpruned) model: coarse importance and fine statistics.

    Args:
        model: the dense causal LM (unchanged; each layer visits ``device`` in turn).
        calib: ``[nsamples, seqlen]`` calibration token ids.
        device: where each decoder layer runs.
        batch_size: sequences per forward pass.
        heads: also collect the attention statistics (``attn_x``, ``attn_o``) for head pruning.
        progress: show a progress bar over layers.

    Returns:
        One :class:`LayerStats` per decoder layer.
    """
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, calib, device, batch_size)
    out: list[LayerStats] = []
    for idx in tqdm(range(len(layers)), desc="block stats", unit="layer", disable=not progress):
        layer = layers[idx]
        home = module_device(layer)
        layer.to(device)
        out.append(_layer_stats(layer, inputs, device, heads))
        layer.to(home)
    return out


def _layer_stats(layer: nn.Module, inputs: LayerInputs, device: torch.device, heads: bool) -> LayerStats:
    """Statistics of one decoder layer; ``inputs.hidden`` is replaced by the layer's outputs."""
    mlp = mlp_of(layer)
    mods = {"mlp_x": mlp.gate_proj, "mlp_h": mlp.down_proj}
    if heads:
        attn = attn_of(layer)
        mods.update(attn_x=attn.q_proj, attn_o=attn.o_proj)
    accs = {k: ActSqNorm(m.in_features, device) for k, m in mods.items()}
    total = [0.0, 0]  # sum of per-token angular distances, tokens

    def run(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs.hidden[b], run_layer(layer, inputs, b)

    def advance(b: int, io: tuple[torch.Tensor, torch.Tensor], _fed) -> None:
        d = angular_distance(*io)
        total[0] += float(d.sum())
        total[1] += d.numel()
        inputs.hidden[b] = io[1]  # the next layer's input

    collect(mods, {k: {k: a} for k, a in accs.items()}, [partial(run, b) for b in range(len(inputs))],
            on_batch=advance)
    return LayerStats(total[0] / max(total[1], 1), **{k: a.result().cpu() for k, a in accs.items()})
