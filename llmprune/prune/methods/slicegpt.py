"""SliceGPT: rotate the residual stream to its principal components, then delete the weakest directions.

SliceGPT (Ashkboos et al., 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
https://arxiv.org/abs/2401.15024), layer by layer (one decoder layer on the device at a time):

1. *computational invariance*: every norm's scale (and LayerNorm's shift) is folded into the linears that read it,
   and for LayerNorm (OPT) the mean subtraction into every matrix that writes the residual stream
   (:func:`~llmprune.prune.rotate.center_output`), so each norm becomes a scale-free RMS norm
   (:class:`~llmprune.model.sliced.RMSN`) and any orthogonal change of residual basis can be absorbed by weights;
2. the basis of block ``l``'s input is ``Q_l``, the eigenvectors of ``X_l^T X_l`` (PCA of the block inputs,
   :func:`~llmprune.prune.rotate.pca_basis`), from the *sliced* model's own activations (``pca="sequential"``,
   as the paper) or the dense model's (``pca="dense"``); the MLP input has its own basis ``M_l`` (PCA of the
   residual after attention); block ``l`` reads ``h Q_l[:, :k]``, writes its attention output in ``M_l`` and its
   MLP output in ``Q_{l+1}``; its skips carry the shortcuts ``Q_l^T M_l`` (attention) and ``M_l^T Q_{l+1}``
   (MLP). One basis per block instead (the MLP reading in ``Q_l``) projects every attention output onto the
   block input's subspace: on SmolLM2-135M at 10% slicing that alone costs ppl ~1,350 vs ~95 with two;
3. the embeddings are rotated by ``Q_0`` and ``lm_head`` by ``Q_L``; both keep the whole vocabulary.

``sparsity`` is the fraction of the hidden (embedding) dimension removed; the kept width is rounded down to a
multiple of ``round_to``. Tied embeddings stay tied by default: the final norm then ends in a ``[k, k]`` map
``Q_L^T diag(g) Q_0`` (``norm.proj``) so that ``lm_head`` can be the rotated embedding table (the head then sees
the embedding rows projected onto ``Q_0``'s kept directions); ``untie_embeddings`` instead gives ``lm_head`` its own
``[V, k]`` table (more parameters, exact at 0% slicing). LayerNorm models (OPT) are always untied: the mean-free
embedding rows the fold needs would change a tied head's logits.
The result is a smaller dense model (:mod:`llmprune.model.sliced`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import capture_layer_inputs
from llmprune.config import PruneConfig, check_float, check_int
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.model.access import decoder_layers, decoder_layers_path
from llmprune.model.device import module_device
from llmprune.model.residual import (
    BlockParts,
    block_parts,
    install_shortcut,
    model_parts,
    set_embedding,
    set_linear,
)
from llmprune.model.sliced import is_sliced, mark_sliced, replace_norm
from llmprune.prune import rotate
from llmprune.prune.methods.slicegpt_signals import (
    dense_mids_and_outputs,
    head_inputs_xtx,
    joint_basis,
    pca_top,
    rotate_reads,
    sequential_mids,
    sequential_outputs,
)
from llmprune.prune.report import ModuleReport
from llmprune.sparsity import SparsityPattern

log = logging.getLogger(__name__)


@dataclass
class SliceGPTConfig(PruneConfig):
    """SliceGPT slicing.

    Attributes:
        sparsity: fraction of the hidden (embedding) dimension removed, in [0, 1) (0 only rotates).
        round_to: the kept width is a multiple of this (8: tensor-core friendly; keeps N:M 2:4 / 4:8 possible).
        pca: ``"sequential"`` (PCA of each block's inputs in the already sliced model, as the paper) or
            ``"dense"`` (of the dense model's activations).
        untie_embeddings: give a tied ``lm_head`` its own ``[V, k]`` table instead of keeping it tied through a
            ``[k, k]`` map at the end of the final norm.
        damp: diagonal damping of ``X^T X`` before the eigendecomposition, as a fraction of its mean.
        head_weight: with tied embeddings kept tied, the embedding basis ``Q_0`` also serves ``lm_head``: it is
            the PCA of ``(1 - w) C_emb + w C_head``, the trace-normalized second moments of the embedding rows
            the calibration text uses and of the dense model's final-norm outputs (the head's inputs; one extra
            dense pass). 0 uses the embedding rows only. On SmolLM2-135M (tied) at 10% / 25% slicing,
            ``w = 0.8`` gives WikiText-2 ppl 68 / 160 vs 131 / 423 with 0 (4 x 256-token windows; dense 36.5).
    """

    method: ClassVar[str] = "slicegpt"

    sparsity: SparsityPattern | str | float = 0.25
    round_to: int = 8
    pca: str = "sequential"
    untie_embeddings: bool = False
    damp: float = 0.01
    head_weight: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, bool) and self.sparsity in (0, "0", "0.0"):
            self.sparsity = SparsityPattern(ratio=0.0)  # rotation only (the ratio parser wants (0, 1))
        super().__post_init__()
        if self.sparsity.is_nm:
            raise ConfigError(f"slicegpt removes whole residual dimensions: sparsity must be a ratio in [0, 1) "
                              f"such as 0.25, not N:M ({self.sparsity}); combine with an N:M method in a later "
                              "recipe stage instead")
        check_int("round_to", self.round_to)
        if self.pca not in ("sequential", "dense"):
            raise ConfigError(f"pca must be 'sequential' or 'dense', got {self.pca!r}")
        if not isinstance(self.untie_embeddings, bool):
            raise ConfigError(f"untie_embeddings must be true or false, got {self.untie_embeddings!r}")
        check_float("damp", self.damp, 0.0, 1.0)
        check_float("head_weight", self.head_weight, 0.0, 1.0)
        if self.ignore:
            raise ConfigError("slicegpt slices the residual stream of every layer: ignore patterns are not "
                              f"supported (got {list(self.ignore)})")


def _fold_layer(bp: BlockParts, layer: nn.Module, layernorm: bool, d: int) -> None:
    """Fold the layer's norm scales (and LayerNorm shifts / mean subtraction) into its linears; scale-free norms."""
    for norm_name, readers in ((bp.attn_norm, bp.attn_in), (bp.mlp_norm, bp.mlp_in)):
        norm = getattr(layer, norm_name)
        shift = getattr(norm, "bias", None) if layernorm else None
        for lin in readers:
            set_linear(lin, *rotate.fold_norm(lin.weight, lin.bias, norm.weight, shift))
        replace_norm(layer, norm_name, d)
    if layernorm:
        for lin in (bp.attn_out, bp.mlp_out):
            set_linear(lin, *rotate.center_output(lin.weight, lin.bias))


def _check_model(model: nn.Module, cfg: SliceGPTConfig) -> tuple[int, int]:
    if is_sliced(model):
        raise LlmpruneError("the model is already sliced by slicegpt; slice the original model instead")
    if type(model.config).model_type.startswith("llmprune_"):
        raise LlmpruneError("slicegpt must run before structured (cfsp) pruning, not after it")
    parts = model_parts(model)
    for layer in decoder_layers(model):
        block_parts(layer)
    d = parts.embeddings[0].weight.shape[1]
    return d, rotate.sliced_dim(d, cfg.sparsity.ratio, cfg.round_to)


@torch.no_grad()
def slicegpt_prune(model: nn.Module, cfg: SliceGPTConfig, ctx,
                   basis: Callable[[list[torch.Tensor], int], torch.Tensor] | None = None) -> list[ModuleReport]:
    """Fold, rotate and slice ``model`` in place (a ``"model"``-kind method; ``ctx``: calibration, device).

    Args:
        model: a Llama/Mistral/Qwen2/OPT causal LM (decoder layers visit ``ctx.device`` one at a time).
        cfg: the slicing options.
        ctx: :class:`llmprune.api.PruneContext` (calibration ids ``[n, seqlen]``, device, batch size).
        basis: ``(block inputs [..., d] per batch, k) -> [d, k]`` orthonormal columns; default the top-``k``
            PCA directions (and the tied head's joint basis for ``Q_0``; tests pass random orthogonal bases to
            check computational invariance).

    Returns:
        One :class:`ModuleReport` per decoder-layer linear (fraction of its weights removed).
    """
    default_basis = basis is None
    if basis is None:
        basis = partial(pca_top, damp=cfg.damp)
    d, k = _check_model(model, cfg)
    parts = model_parts(model)
    layers, prefix = decoder_layers(model), decoder_layers_path(model)
    head, emb = parts.head, parts.embeddings[0]
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    # LayerNorm models (OPT) are always untied: centering the embedding rows would change a tied head's logits
    keep_tied = tied and not cfg.untie_embeddings and not parts.layernorm
    if tied and not keep_tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False
    if parts.layernorm:  # LayerNorm -> RMSNorm needs mean-free residual writes (embeddings too)
        for e in parts.embeddings:
            set_embedding(e, rotate.center_rows(e.weight))
    t0 = time.perf_counter()
    inputs = capture_layer_inputs(model, ctx.calib, ctx.device, ctx.batch_size)
    if keep_tied and cfg.head_weight > 0 and default_basis:  # Q_0 also serves the head (see head_weight)
        head_xtx = head_inputs_xtx(model, inputs, ctx.device, ctx.progress)
        q = q0 = joint_basis(inputs.hidden, head_xtx, k, cfg.head_weight, cfg.damp).to(ctx.device)
        del head_xtx
    else:
        q = q0 = basis(inputs.hidden, k).double().to(ctx.device)
    for e in parts.embeddings:
        set_embedding(e, rotate.rotate_embedding(e.weight, q.to(e.weight.device)))
    sequential = cfg.pca == "sequential"
    if sequential:
        inputs.hidden = [(h.double() @ q).to(h.dtype) for h in inputs.hidden]
    reports: list[ModuleReport] = []
    shortcuts: list[bool] = []
    for idx in tqdm(range(len(layers)), desc="slicegpt", unit="layer", disable=not ctx.progress):
        t1 = time.perf_counter()
        layer = layers[idx]
        home = module_device(layer)
        layer.to(ctx.device)
        bp = block_parts(layer)
        before = {n: tuple(m.weight.shape) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        _fold_layer(bp, layer, parts.layernorm, d)
        if not sequential:  # dense PCA: the folded (still unrotated) block on the dense activations
            mids, outs = dense_mids_and_outputs(layer, bp, inputs)
        rotate_reads(bp.attn_in, q)
        if sequential:
            mids = sequential_mids(layer, bp, inputs, q)
        # the MLP input has its own basis (the paper's attention shortcut Q_l^T M_l): what attention adds to
        # the residual need not lie in the block input's principal subspace
        q_mid = basis(mids, k).double().to(ctx.device)
        del mids
        set_linear(bp.attn_out, *rotate.rotate_output(bp.attn_out.weight, bp.attn_out.bias, q_mid))
        install_shortcut(layer, rotate.shortcut(q, q_mid).to(bp.attn_out.weight.dtype), attn=True)
        rotate_reads(bp.mlp_in, q_mid)
        w_down = bp.mlp_out.weight.detach().double()
        b_down = None if bp.mlp_out.bias is None else bp.mlp_out.bias.detach().double()
        if sequential:
            outs = sequential_outputs(layer, bp, inputs, q_mid, w_down, b_down)
        q_next = basis(outs, k).double().to(ctx.device)
        set_linear(bp.mlp_out, *rotate.rotate_output(w_down, b_down, q_next))
        install_shortcut(layer, rotate.shortcut(q_mid, q_next).to(bp.mlp_out.weight.dtype))
        shortcuts.append(True)
        inputs.hidden = [(y.double() @ q_next).to(h.dtype) if sequential else y.to(h.dtype)
                         for y, h in zip(outs, inputs.hidden)]
        del outs
        q = q_next
        layer.to(home)
        secs = time.perf_counter() - t1 + (t1 - t0 if idx == 0 else 0.0)
        for name, shape in before.items():
            removed = 1.0 - layer.get_submodule(name).weight.numel() / (shape[0] * shape[1])
            reports.append(ModuleReport(f"{prefix}.{idx}.{name}", idx, shape, removed, secs / len(before),
                                        "slicegpt"))
    _slice_head(parts, q, q0, keep_tied, d)
    mark_sliced(model, k, shortcuts, head_proj=keep_tied, head_bias=head.bias is not None,
                attn_shortcuts=shortcuts)
    log.info("slicegpt: residual width %d -> %d (%s PCA, embeddings %s)", d, k, cfg.pca,
             "tied" if keep_tied else "untied" if tied else "separate")
    return reports


def _slice_head(parts, q: torch.Tensor, q0: torch.Tensor, keep_tied: bool, d: int) -> None:
    """Fold the final norm into the head side and rotate it by the last basis ``q`` ``[d, k]``."""
    norm = getattr(parts.norm_owner, parts.norm_name)
    shift = getattr(norm, "bias", None) if parts.layernorm else None
    head = parts.head
    dev = head.weight.device
    q, q0 = q.to(dev), q0.to(dev)
    if keep_tied:  # y = n' (q^T diag(g) q0) + shift q0, then the rotated embedding table
        w = q0.T @ (norm.weight.double().to(dev).unsqueeze(1) * q)
        proj = nn.Linear(w.shape[1], w.shape[0], bias=shift is not None, device=dev, dtype=head.weight.dtype)
        set_linear(proj, w, None if shift is None else shift.double().to(dev) @ q0)
        replace_norm(parts.norm_owner, parts.norm_name, d, proj)
        head.weight = parts.embeddings[0].weight  # set_embedding made a new parameter: tie again
        head.in_features = w.shape[0]
        return
    w, b = rotate.fold_norm(head.weight, head.bias, norm.weight.to(dev), None if shift is None else shift.to(dev))
    set_linear(head, rotate.rotate_input(w, q), b)
    replace_norm(parts.norm_owner, parts.norm_name, d)
