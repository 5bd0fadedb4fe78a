"""What SliceGPT's bases are computed from: second moments of block signals, and the passes that produce them.

SliceGPT (Ashkboos et al., 2024, https://arxiv.org/abs/2401.15024) rotates each residual-stream position to the
principal directions of its calibration signal. :mod:`llmprune.prune.methods.slicegpt` drives the layer loop; this
module holds the signal side: ``X^T X`` and its top directions (:func:`pca_top`, :func:`joint_basis`), the dense
final-norm outputs a tied head's basis also serves (:func:`head_inputs_xtx`), and the per-block passes giving the
full-width (original basis) MLP inputs and block outputs of a block that already reads in a sliced basis.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import LayerInputs, run_layer
from llmprune.calibration.collect import collect
from llmprune.model.access import decoder_layers
from llmprune.model.device import module_device
from llmprune.model.residual import BlockParts, model_parts, set_linear
from llmprune.prune import rotate


def xtx(xs: list[torch.Tensor]) -> torch.Tensor:
    """``X^T X`` (float64) over the tokens of ``[..., d]`` tensors."""
    out = None
    for x in xs:
        x2 = x.reshape(-1, x.shape[-1]).double()
        out = x2.T @ x2 if out is None else out.addmm_(x2.T, x2)
    return out


def pca_top(xs: list[torch.Tensor], k: int, damp: float) -> torch.Tensor:
    """The top-``k`` principal directions ``[d, k]`` (float64) of the rows of ``xs``."""
    return rotate.pca_basis(xtx(xs), damp)[1][:, :k]


def joint_basis(xs: list[torch.Tensor], head_xtx: torch.Tensor, k: int, weight: float, damp: float) -> torch.Tensor:
    """The top-``k`` directions ``[d, k]`` of ``(1 - weight) C_x + weight C_head`` (each normalized to trace 1)."""
    c = xtx(xs)
    mix = (1.0 - weight) * c / c.trace().clamp_min(1e-30) + weight * head_xtx / head_xtx.trace().clamp_min(1e-30)
    return rotate.pca_basis(mix, damp)[1][:, :k]


@torch.no_grad()
def head_inputs_xtx(model: nn.Module, inputs: LayerInputs, device: torch.device, progress: bool) -> torch.Tensor:
    """``Z^T Z`` (float64) of the dense model's final-norm outputs ``Z`` on the calibration batches.

    One dense pass, one decoder layer on ``device`` at a time; ``inputs`` is left as it was.
    """
    parts = model_parts(model)
    cur = LayerInputs(list(inputs.hidden), inputs.args, inputs.kwargs)
    for layer in tqdm(decoder_layers(model), desc="slicegpt head basis", unit="layer", disable=not progress):
        home = module_device(layer)
        layer.to(device)
        cur.hidden = [run_layer(layer, cur, b) for b in range(len(cur))]
        layer.to(home)
    norm = getattr(parts.norm_owner, parts.norm_name)
    home = module_device(norm)
    norm.to(device)
    out = xtx([norm(h) for h in cur.hidden])
    norm.to(home)
    return out


class _Last:
    """Accumulator keeping the latest input of a hooked module (for :func:`~llmprune.calibration.collect.collect`)."""

    x: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        self.x = x


def _unrotated(skip: torch.Tensor, act: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
               b: torch.Tensor | None) -> torch.Tensor:
    """The residual ``skip q^T + act w^T + b`` ``[tokens, d]`` in the original basis (fp32) from a skip term
    ``[..., k]`` in basis ``q`` ``[d, k]`` and the writing linear's input ``act`` ``[..., in]``."""
    y = skip.reshape(-1, skip.shape[-1]).float() @ q.T + act.reshape(-1, act.shape[-1]).float() @ w.T
    return y if b is None else y + b


def rotate_reads(linears: list[nn.Linear], q: torch.Tensor) -> None:
    """``linears`` read the residual in basis ``q`` ``[d, k]``."""
    for lin in linears:
        set_linear(lin, rotate.rotate_input(lin.weight, q), lin.bias)


@torch.no_grad()
def sequential_mids(layer: nn.Module, bp: BlockParts, inputs: LayerInputs, q: torch.Tensor) -> list[torch.Tensor]:
    """Full-width (original basis) MLP inputs ``h_mid = h q^T + attn W_o^T + b_o`` of a block reading in ``q``.

    ``attn_out``, ``mlp_in`` and ``mlp_out`` come in with their original (unrotated) weights and leave with them;
    meanwhile they write / read in ``q`` so the layer's forward runs (the first batch in full, later ones stop once
    ``attn_out``'s input is seen).
    """
    o = _Last()
    outs: list[torch.Tensor] = []
    saved = [(lin, lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
             for lin in [bp.attn_out, bp.mlp_out, *bp.mlp_in]]
    qf, wf = q.float(), bp.attn_out.weight.float()
    bf = None if bp.attn_out.bias is None else bp.attn_out.bias.float()
    for lin in (bp.attn_out, bp.mlp_out):
        set_linear(lin, *rotate.rotate_output(lin.weight, lin.bias, q))
    rotate_reads(bp.mlp_in, q)

    def combine(b: int, _value, _fed) -> None:
        h = inputs.hidden[b]
        outs.append(_unrotated(h, o.x, qf, wf, bf).reshape(*h.shape[:-1], -1))

    collect({"o": bp.attn_out}, {"o": {"x": o}}, [partial(run_layer, layer, inputs, b) for b in range(len(inputs))],
            on_batch=combine, stop_early=True)
    for lin, w, bias in saved:
        set_linear(lin, w, bias)
    return outs


@torch.no_grad()
def dense_mids_and_outputs(layer: nn.Module, bp: BlockParts,
                            inputs: LayerInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """MLP inputs and outputs of the folded, still unrotated block on the dense activations."""
    mid = _Last()
    mids: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def keep(_b: int, value, _fed) -> None:
        mids.append(mid.x)
        outs.append(value)

    collect({"mid": getattr(layer, bp.mlp_norm)}, {"mid": {"x": mid}},
            [partial(run_layer, layer, inputs, b) for b in range(len(inputs))], on_batch=keep)
    return mids, outs


@torch.no_grad()
def sequential_outputs(layer: nn.Module, bp: BlockParts, inputs: LayerInputs, q: torch.Tensor,
                        w_down: torch.Tensor, b_down: torch.Tensor | None) -> list[torch.Tensor]:
    """Full-width (original basis) outputs of a block that reads in basis ``q`` ``[d, k]``.

    The MLP output is taken before it meets the skip (``down_proj``'s input times the original weight ``w_down``)
    and the skip is mapped back by ``q^T``: ``Y = h_mid q^T + a W_down^T + b``, the residual the next block's PCA
    must see before it is sliced. ``down_proj`` meanwhile writes in ``q`` so the layer's own forward runs.
    """
    set_linear(bp.mlp_out, *rotate.rotate_output(w_down, b_down, q))
    mid, act = _Last(), _Last()
    outs: list[torch.Tensor] = []
    qf, wf = q.float(), w_down.float()
    bf = None if b_down is None else b_down.float()

    def combine(b: int, _value, _fed) -> None:
        outs.append(_unrotated(mid.x, act.x, qf, wf, bf).reshape(*inputs.hidden[b].shape[:-1], -1))

    collect({"mid": getattr(layer, bp.mlp_norm), "act": bp.mlp_out}, {"mid": {"x": mid}, "act": {"x": act}},
            [partial(run_layer, layer, inputs, b) for b in range(len(inputs))], on_batch=combine)
    return outs
