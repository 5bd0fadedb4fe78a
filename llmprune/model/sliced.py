"""SliceGPT-sliced models: a narrower residual stream, scale-free norms, residual-shortcut matrices.

A model sliced by :mod:`llmprune.prune.methods.slicegpt` (Ashkboos et al., 2024,
https://arxiv.org/abs/2401.15024) keeps its architecture but every matrix that reads or writes the residual
stream is narrower (``k`` of the original ``d`` dimensions): embeddings ``[V, k]``, ``q/k/v``, ``gate/up``
(``fc1``) ``[out, k]``, ``o``/``down`` (``out_proj``/``fc2``) ``[k, in]``, ``lm_head`` ``[V, k]``. Attention
heads, FFN width and vocabulary are unchanged. Besides the weights:

* every norm is :class:`RMSN`, a scale-free RMS normalisation whose mean runs over the *original* ``d`` (the
  folded-away scales live in the following linears; sliced directions carry little energy, so the sum over ``k``
  approximates the sum over ``d``, as in the paper's code);
* decoder layer ``l`` reads its residual in basis ``Q_l`` and writes its MLP output in ``Q_{l+1}``; its MLP skip
  connection carries ``h Q_l^T Q_{l+1}`` (the paper's shortcut matrix, a :class:`Shortcut` ``[k, k]`` at
  ``<layer>.shortcut.weight``), applied by forward hooks, so no transformers forward is copied;
* with tied embeddings kept tied, the final norm maps its output through a ``[k, k]`` matrix (``norm.proj``):
  ``Q_L^T diag(g) Q_0`` (and the LayerNorm shift), so ``lm_head`` can stay the rotated embedding table.

Loading. The config keeps the base model's fields (``hidden_size`` stays ``d``; ``head_dim`` explicit) and adds
``llmprune_sliced_dim``, ``llmprune_sliced_shortcuts`` (per layer), ``llmprune_sliced_head_proj``,
``llmprune_sliced_head_bias``; its ``model_type`` is ``sliced_<base>`` (``sliced_llama``, ``sliced_mistral``,
``sliced_qwen2``, ``sliced_opt``), registered with ``AutoConfig``/``AutoModelForCausalLM`` by ``import llmprune``,
so ``AutoModelForCausalLM.from_pretrained(DIR)`` builds the narrow modules and loads the plain safetensors; plain
transformers refuses the unknown type instead of loading wrong shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.model.access import decoder_layers

SLICED_PREFIX = "sliced_"
_BASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
}
_SLICED: dict[str, tuple[type, type]] = {}


class RMSN(nn.Module):
    """Scale-free RMS norm ``x / sqrt(sum(x^2) / mean_dim + eps)``, optionally followed by ``proj`` ``[k, k]``."""

    def __init__(self, mean_dim: int, eps: float, proj: nn.Linear | None = None) -> None:
        super().__init__()
        self.mean_dim, self.eps = int(mean_dim), float(eps)
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.eps)).to(x.dtype)
        return self.proj(y) if self.proj is not None else y


class Shortcut(nn.Module):
    """The MLP skip connection's change of basis ``weight`` ``[k, k]`` (not an ``nn.Linear``: never pruned)."""

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


def _stash_mid(module: nn.Module, args: tuple) -> None:
    module._llmprune_mid = args[0]  # a plain tensor attribute: not a parameter, not saved


def _apply_shortcut(norm_name: str, layer: nn.Module, args, output):
    """``out = h_mid + mlp`` becomes ``h_mid S + mlp`` (in fp32, then the output dtype)."""
    norm = getattr(layer, norm_name)
    mid, norm._llmprune_mid = norm._llmprune_mid, None
    out = output[0] if isinstance(output, (tuple, list)) else output
    mid = mid.reshape(out.shape)
    w = layer.shortcut.weight
    new = (out.float() - mid.float() + (mid @ w.to(mid.dtype)).float()).to(out.dtype)
    if isinstance(output, (tuple, list)):
        return type(output)((new, *output[1:]))
    return new


def install_shortcut(layer: nn.Module, weight: torch.Tensor) -> None:
    """Give ``layer`` the MLP skip shortcut ``weight`` ``[k, k]``.

    The hooks are installed once per layer (after its norms were replaced): a pre-hook on the MLP norm keeps its
    input ``h_mid``, a forward hook on the layer swaps the skip term. ``functools.partial`` (not closures) so a
    ``copy.deepcopy`` of the model hooks its own modules.
    """
    if isinstance(getattr(layer, "shortcut", None), Shortcut):
        layer.shortcut.weight = nn.Parameter(weight, requires_grad=False)
        return
    layer.shortcut = Shortcut(weight)
    name = block_parts(layer).mlp_norm
    getattr(layer, name).register_forward_pre_hook(_stash_mid)
    layer.register_forward_hook(functools.partial(_apply_shortcut, name))


# --------------------------------------------------------------------------- building / marking


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-6


def replace_norm(owner: nn.Module, name: str, mean_dim: int, proj: nn.Linear | None = None) -> None:
    """``owner.<name>`` becomes a scale-free :class:`RMSN` (same eps)."""
    old = getattr(owner, name)
    setattr(owner, name, RMSN(mean_dim, old.eps if isinstance(old, RMSN) else _norm_eps(old), proj))


def _empty(lin_or_emb: nn.Module, *shape: int) -> torch.Tensor:
    w = lin_or_emb.weight
    return torch.empty(*shape, dtype=w.dtype, device=w.device)


def build_sliced(model: nn.Module, config) -> None:
    """Shrink a freshly built (uninitialised) base model to the sliced structure its config records."""
    k, d = check_sliced_config(config)
    parts = model_parts(model)
    for emb in parts.embeddings:
        set_embedding(emb, _empty(emb, emb.weight.shape[0], k))
    for layer, has_sc in zip(decoder_layers(model), config.llmprune_sliced_shortcuts):
        bp = block_parts(layer)
        for lin in bp.attn_in + bp.mlp_in:
            set_linear(lin, _empty(lin, lin.out_features, k), None if lin.bias is None else lin.bias.data)
        for lin in (bp.attn_out, bp.mlp_out):
            set_linear(lin, _empty(lin, k, lin.in_features), None if lin.bias is None else _empty(lin, k))
        replace_norm(layer, bp.attn_norm, d)
        replace_norm(layer, bp.mlp_norm, d)
        if has_sc:
            install_shortcut(layer, _empty(bp.mlp_out, k, k))
    head = parts.head
    proj = None
    if config.llmprune_sliced_head_proj:
        proj = nn.Linear(k, k, bias=parts.layernorm, device=head.weight.device, dtype=head.weight.dtype)
    replace_norm(parts.norm_owner, parts.norm_name, d, proj)
    if getattr(config, "tie_word_embeddings", False):
        head.weight = parts.embeddings[0].weight
        head.in_features = k
    else:
        bias = _empty(head, head.out_features) if config.llmprune_sliced_head_bias else None
        set_linear(head, _empty(head, head.out_features, k), bias)


def check_sliced_config(config) -> tuple[int, int]:
    """``(k, d)`` of a sliced config, validated (one-line :class:`LlmpruneError` naming the field)."""
    k, d = getattr(config, "llmprune_sliced_dim", None), getattr(config, "hidden_size", None)
    if type(k) is not int or type(d) is not int or not 0 < k <= d:
        raise LlmpruneError(f"llmprune_sliced_dim must be an integer in [1, hidden_size={d}], got {k!r}")
    sc = getattr(config, "llmprune_sliced_shortcuts", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(sc, (list, tuple)) or len(sc) != n or not all(isinstance(v, bool) for v in sc):
        raise LlmpruneError(f"llmprune_sliced_shortcuts must be a list of {n} booleans, got {sc!r}")
    for field in ("llmprune_sliced_head_proj", "llmprune_sliced_head_bias"):
        if not isinstance(getattr(config, field, None), bool):
            raise LlmpruneError(f"{field} must be true or false, got {getattr(config, field, None)!r}")
    return k, d


def sliced_classes(base_model_type: str) -> tuple[type, type]:
    """``(config class, causal-LM class)`` of ``sliced_<base>``, created and registered once."""
    if base_model_type in _SLICED:
        return _SLICED[base_model_type]
    if base_model_type not in _BASES:
        raise LlmpruneError(f"slicegpt does not support model type {base_model_type!r} "
                            f"(supported: {', '.join(_BASES)})")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_name, lm_name = _BASES[base_model_type]
    base_cfg, base_lm = getattr(transformers, cfg_name), getattr(transformers, lm_name)
    config_cls = type("Sliced" + cfg_name, (base_cfg,), {
        "model_type": SLICED_PREFIX + base_model_type,
        "__doc__": f"{cfg_name} of a SliceGPT-sliced model (narrow residual stream, llmprune)."})

    def lm_init(self, config):
        check_sliced_config(config)  # before building: bad fields never reach torch
        base_lm.__init__(self, config)
        build_sliced(self, config)

    lm_cls = type("Sliced" + lm_name, (base_lm,), {
        "config_class": config_cls, "__init__": lm_init, "__doc__": f"{lm_name} sliced by SliceGPT (llmprune)."})
    lm_cls.__module__ = config_cls.__module__ = __name__
    globals()[config_cls.__name__], globals()[lm_cls.__name__] = config_cls, lm_cls
    AutoConfig.register(config_cls.model_type, config_cls)
    AutoModelForCausalLM.register(config_cls, lm_cls)
    _SLICED[base_model_type] = (config_cls, lm_cls)
    return config_cls, lm_cls


def register_all() -> None:
    """Register ``sliced_<base>`` for every supported base with transformers' auto classes."""
    for base in _BASES:
        sliced_classes(base)


def is_sliced(model: nn.Module) -> bool:
    return getattr(model.config, "llmprune_sliced_dim", None) is not None


def mark_sliced(model: nn.Module, dim: int, shortcuts: list[bool], head_proj: bool, head_bias: bool) -> None:
    """Make ``model.config`` (and class) describe a model sliced in place to residual width ``dim``."""
    cfg = model.config
    base = type(cfg).model_type
    config_cls, lm_cls = sliced_classes(base)
    if getattr(cfg, "head_dim", None) is None and hasattr(cfg, "num_attention_heads") and base != "opt":
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.llmprune_sliced_dim = int(dim)
    cfg.llmprune_sliced_shortcuts = [bool(s) for s in shortcuts]
    cfg.llmprune_sliced_head_proj = bool(head_proj)
    cfg.llmprune_sliced_head_bias = bool(head_bias)
    cfg.__class__ = config_cls
    if "model_type" in vars(cfg):
        vars(cfg)["model_type"] = config_cls.model_type
    model.__class__ = lm_cls


def save_sliced(model, directory) -> None:
    """Same files as ``dense`` (plain safetensors); the config names ``sliced_<base>``."""
    model.save_pretrained(directory, safe_serialization=True)
