"""Per-block calibration statistics for structured pruning (CFSP's coarse and fine signals).

One layer-by-layer pass of the unpruned model (the same driver as the unstructured
methods: one decoder layer on the device at a time) gives, per decoder layer:

* ``importance``: mean angular distance ``arccos(cos(x_in, x_out)) / pi`` between the
  layer's input and output hidden states (coarse, between blocks);
* mean squared inputs of the MLP (``mlp_x``), of ``down_proj`` (``mlp_h``) and, for head
  pruning, of the attention (``attn_x``) and of ``o_proj`` (``attn_o``) (fine, inside a block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import capture_layer_inputs, run_layer
from llmprune.calibration.stats import ActSqNorm, feed_hook
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
    model: nn.Module, calib: torch.Tensor, device, batch_size: int, heads: bool, progress: bool
) -> list[LayerStats]:
    """One layer-by-layer pass of the (unpruned) model: coarse importance and fine statistics."""
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, calib, device, batch_size)
    out: list[LayerStats] = []
    for idx in tqdm(range(len(layers)), desc="block stats", unit="layer", disable=not progress):
        layer = layers[idx]
        home = module_device(layer)
        layer.to(device)
        mlp = mlp_of(layer)
        accs = {"mlp_x": ActSqNorm(mlp.gate_proj.in_features, device), "mlp_h": ActSqNorm(mlp.down_proj.in_features, device)}
        mods = {"mlp_x": mlp.gate_proj, "mlp_h": mlp.down_proj}
        if heads:
            attn = attn_of(layer)
            accs["attn_x"] = ActSqNorm(attn.q_proj.in_features, device)
            accs["attn_o"] = ActSqNorm(attn.o_proj.in_features, device)
            mods.update(attn_x=attn.q_proj, attn_o=attn.o_proj)
        handles = [mods[k].register_forward_hook(feed_hook({k: accs[k]})) for k in accs]
        dist, count = 0.0, 0
        try:
            for b in range(len(inputs)):
                x_in = inputs.hidden[b]
                x_out = run_layer(layer, inputs, b)
                d = angular_distance(x_in, x_out)
                dist += float(d.sum())
                count += d.numel()
                inputs.hidden[b] = x_out
        finally:
            for h in handles:
                h.remove()
        layer.to(home)
        out.append(LayerStats(dist / max(count, 1), **{k: a.result().cpu() for k, a in accs.items()}))
    return out
