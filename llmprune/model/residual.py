"""Where a decoder layer reads and writes its residual stream, and the skip connections' change-of-basis hooks.

Used by SliceGPT (:mod:`llmprune.prune.methods.slicegpt`) to rotate and slice every matrix touching the residual
stream, and by the sliced model type (:mod:`llmprune.model.sliced`) to rebuild that structure at load time.
Llama/Mistral/Qwen2 (RMSNorm, gated MLP) and pre-LayerNorm OPT layouts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import LlmpruneError


class Shortcut(nn.Module):
    """A skip connection's change of basis ``weight`` ``[k, k]`` (not an ``nn.Linear``: never pruned)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


@dataclass
class BlockParts:
    """Where one decoder layer keeps what SliceGPT rotates.

    Attributes:
        attn_norm, mlp_norm: attribute names (on the layer) of the norms before attention / MLP.
        attn_in, mlp_in: linears reading the normalised residual (q/k/v; gate/up or fc1).
        attn_out, mlp_out: linears writing the residual (o_proj / out_proj; down_proj / fc2).
    """

    attn_norm: str
    mlp_norm: str
    attn_in: list[nn.Linear]
    attn_out: nn.Linear
    mlp_in: list[nn.Linear]
    mlp_out: nn.Linear


@dataclass
class ModelParts:
    """Model-level pieces: embeddings writing the residual, the final norm (owner + name), the head."""

    embeddings: list[nn.Embedding]
    norm_owner: nn.Module
    norm_name: str
    head: nn.Linear
    layernorm: bool


def _unsupported(what: str) -> LlmpruneError:
    return LlmpruneError(f"slicegpt supports Llama, Mistral, Qwen2 and OPT layouts; {what}")


def block_parts(layer: nn.Module) -> BlockParts:
    """The :class:`BlockParts` of a Llama/Mistral/Qwen2 or OPT (pre-LayerNorm) decoder layer."""
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise _unsupported(f"{type(layer).__name__} has no self_attn")
    if hasattr(layer, "input_layernorm") and hasattr(getattr(layer, "mlp", None), "down_proj"):
        mlp = layer.mlp
        return BlockParts("input_layernorm", "post_attention_layernorm", [attn.q_proj, attn.k_proj, attn.v_proj],
                          attn.o_proj, [mlp.gate_proj, mlp.up_proj], mlp.down_proj)
    if hasattr(layer, "fc1") and hasattr(layer, "self_attn_layer_norm"):
        if not getattr(layer, "do_layer_norm_before", True):
            raise _unsupported("post-LayerNorm OPT (opt-350m) is not")
        return BlockParts("self_attn_layer_norm", "final_layer_norm", [attn.q_proj, attn.k_proj, attn.v_proj],
                          attn.out_proj, [layer.fc1], layer.fc2)
    raise _unsupported(f"{type(layer).__name__} is not one of them")


def model_parts(model: nn.Module) -> ModelParts:
    """The :class:`ModelParts` of a supported causal LM."""
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if inner is not None and hasattr(inner, "embed_tokens") and hasattr(inner, "norm") and head is not None:
        return ModelParts([inner.embed_tokens], inner, "norm", head, layernorm=False)
    dec = getattr(inner, "decoder", None)
    if dec is not None and hasattr(dec, "embed_positions") and head is not None:
        if getattr(dec, "project_in", None) is not None or getattr(dec, "project_out", None) is not None:
            raise _unsupported("OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not")
        return ModelParts([dec.embed_tokens, dec.embed_positions], dec, "final_layer_norm", head, layernorm=True)
    raise _unsupported(f"{type(model).__name__} is not one of them")


def set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace a linear's parameters (new shapes allowed), keeping its dtype and device."""
    dt, dev, grad = lin.weight.dtype, lin.weight.device, lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.to(dev, dt), requires_grad=grad)
    lin.bias = None if bias is None else nn.Parameter(bias.to(dev, dt), requires_grad=grad)
    lin.out_features, lin.in_features = weight.shape


def set_embedding(emb: nn.Embedding, table: torch.Tensor) -> None:
    """Replace an embedding table (new width allowed), keeping its dtype and device."""
    emb.weight = nn.Parameter(table.to(emb.weight.device, emb.weight.dtype), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = table.shape[1]


# --------------------------------------------------------------------------- shortcut hooks


def _stash_input(layer: nn.Module, module: nn.Module, args: tuple) -> None:
    """Attention-norm pre-hook: keep the layer input ``h`` while the layer has an attention shortcut."""
    if getattr(layer, "attn_shortcut", None) is not None:
        module._llmprune_in = args[0]  # a plain tensor attribute: not a parameter, not saved


def _mid_with_attn_shortcut(layer: nn.Module, attn_norm_name: str, norm: nn.Module, args: tuple):
    """MLP-norm pre-hook: ``h_mid = h + attn`` becomes ``h S_attn + attn``; both are kept for the layer hook."""
    mid = args[0]
    norm._llmprune_mid = norm._llmprune_true_mid = mid
    sc = getattr(layer, "attn_shortcut", None)
    if sc is None:
        return None
    attn_norm = getattr(layer, attn_norm_name)
    h, attn_norm._llmprune_in = attn_norm._llmprune_in, None
    h = h.reshape(mid.shape)
    true_mid = (mid.float() - h.float() + (h @ sc.weight.to(h.dtype)).float()).to(mid.dtype)
    norm._llmprune_true_mid = true_mid
    return (true_mid, *args[1:])


def _apply_shortcuts(norm_name: str, layer: nn.Module, args, output):
    """``out = h_mid + mlp`` (``h_mid`` as the layer computed it) becomes ``h_mid' S_mlp + mlp`` (fp32 sums).

    ``h_mid'`` is the attention-shortcut-corrected residual (``h_mid`` itself when the layer has none) and
    ``S_mlp`` the MLP skip's change of basis (identity when the layer has none).
    """
    norm = getattr(layer, norm_name)
    mid, true_mid = norm._llmprune_mid, norm._llmprune_true_mid
    norm._llmprune_mid = norm._llmprune_true_mid = None
    out = output[0] if isinstance(output, (tuple, list)) else output
    mid, true_mid = mid.reshape(out.shape), true_mid.reshape(out.shape)
    sc = getattr(layer, "shortcut", None)
    skip = true_mid if sc is None else true_mid @ sc.weight.to(true_mid.dtype)
    new = (out.float() - mid.float() + skip.float()).to(out.dtype)
    if isinstance(output, (tuple, list)):
        return type(output)((new, *output[1:]))
    return new


def _install_hooks(layer: nn.Module) -> None:
    """Once per layer (after its norms were replaced): the hooks that apply ``shortcut`` / ``attn_shortcut``.

    A pre-hook on the attention norm keeps the layer input ``h``; a pre-hook on the MLP norm swaps the attention
    skip term in its input; a forward hook on the layer swaps both skip terms in its output. ``functools.partial``
    (not closures) so a ``copy.deepcopy`` of the model hooks its own modules.
    """
    if getattr(layer, "_llmprune_shortcut_hooks", False):
        return
    bp = block_parts(layer)
    getattr(layer, bp.attn_norm).register_forward_pre_hook(functools.partial(_stash_input, layer))
    mlp_norm = getattr(layer, bp.mlp_norm)
    mlp_norm.register_forward_pre_hook(functools.partial(_mid_with_attn_shortcut, layer, bp.attn_norm))
    layer.register_forward_hook(functools.partial(_apply_shortcuts, bp.mlp_norm))
    layer._llmprune_shortcut_hooks = True


def install_shortcut(layer: nn.Module, weight: torch.Tensor, attn: bool = False) -> None:
    """Give ``layer`` a skip-connection change of basis ``weight`` ``[k, k]``.

    Args:
        layer: a decoder layer whose norms are already :class:`RMSN`.
        weight: ``Q_from^T Q_to`` restricted to the kept directions.
        attn: the attention skip (``<layer>.attn_shortcut``: block input basis -> MLP input basis) instead of
            the MLP skip (``<layer>.shortcut``: MLP input basis -> next block's input basis).
    """
    name = "attn_shortcut" if attn else "shortcut"
    if isinstance(getattr(layer, name, None), Shortcut):
        getattr(layer, name).weight = nn.Parameter(weight, requires_grad=False)
    else:
        setattr(layer, name, Shortcut(weight))
    _install_hooks(layer)
