"""SliceGPT-sliced models: a narrower residual stream, scale-free norms, residual-shortcut matrices.

A model sliced by :mod:`llmprune.prune.methods.slicegpt` (Ashkboos et al., 2024,
https://arxiv.org/abs/2401.15024) keeps its architecture but every matrix that reads or writes the residual
stream is narrower (``k`` of the original ``d`` dimensions): embeddings ``[V, k]``, ``q/k/v``, ``gate/up``
(``fc1``) ``[out, k]``, ``o``/``down`` (``out_proj``/``fc2``) ``[k, in]``, ``lm_head`` ``[V, k]``. Attention
heads, FFN width and vocabulary are unchanged. Besides the weights:

* every norm is :class:`RMSN`, a scale-free RMS normalisation whose mean runs over the *original* ``d`` (the
  folded-away scales live in the following linears; sliced directions carry little energy, so the sum over ``k``
  approximates the sum over ``d``, as in the paper's code);
* decoder layer ``l`` reads its residual in basis ``Q_l``, writes its attention output in the MLP input basis
  ``M_l`` and its MLP output in ``Q_{l+1}``; its attention skip carries ``h Q_l^T M_l`` and its MLP skip
  ``h_mid M_l^T Q_{l+1}`` (the paper's shortcut matrices, :class:`Shortcut` ``[k, k]`` at
  ``<layer>.attn_shortcut.weight`` and ``<layer>.shortcut.weight``), applied by forward hooks, so no
  transformers forward is copied (checkpoints without ``attn_shortcut`` read the MLP input in ``Q_l``);
* with tied embeddings kept tied, the final norm maps its output through a ``[k, k]`` matrix (``norm.proj``):
  ``Q_L^T diag(g) Q_0`` (and the LayerNorm shift), so ``lm_head`` can stay the rotated embedding table.

Loading. The config keeps the base model's fields (``hidden_size`` stays ``d``; ``head_dim`` explicit) and adds
``llmprune_sliced_dim``, ``llmprune_sliced_shortcuts`` and ``llmprune_sliced_attn_shortcuts`` (per layer),
``llmprune_sliced_head_proj``, ``llmprune_sliced_head_bias``; its ``model_type`` is ``sliced_<base>`` (``sliced_llama``, ``sliced_mistral``,
``sliced_qwen2``, ``sliced_opt``), registered with ``AutoConfig``/``AutoModelForCausalLM`` by ``import llmprune``,
so ``AutoModelForCausalLM.from_pretrained(DIR)`` builds the narrow modules and loads the plain safetensors; plain
transformers refuses the unknown type instead of loading wrong shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.model.access import decoder_layers
from llmprune.model.residual import block_parts, install_shortcut, model_parts, set_embedding, set_linear

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
    attn_sc = getattr(config, "llmprune_sliced_attn_shortcuts", None) or [False] * len(config.llmprune_sliced_shortcuts)
    for layer, has_sc, has_attn_sc in zip(decoder_layers(model), config.llmprune_sliced_shortcuts, attn_sc):
        bp = block_parts(layer)
        for lin in bp.attn_in + bp.mlp_in:
            set_linear(lin, _empty(lin, lin.out_features, k), None if lin.bias is None else lin.bias.data)
        for lin in (bp.attn_out, bp.mlp_out):
            set_linear(lin, _empty(lin, k, lin.in_features), None if lin.bias is None else _empty(lin, k))
        replace_norm(layer, bp.attn_norm, d)
        replace_norm(layer, bp.mlp_norm, d)
        if has_sc:
            install_shortcut(layer, _empty(bp.mlp_out, k, k))
        if has_attn_sc:
            install_shortcut(layer, _empty(bp.mlp_out, k, k), attn=True)
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
    asc = getattr(config, "llmprune_sliced_attn_shortcuts", None)  # absent in single-basis checkpoints
    if asc is not None and (not isinstance(asc, (list, tuple)) or len(asc) != n
                            or not all(isinstance(v, bool) for v in asc)):
        raise LlmpruneError(f"llmprune_sliced_attn_shortcuts must be a list of {n} booleans, got {asc!r}")
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


def mark_sliced(model: nn.Module, dim: int, shortcuts: list[bool], head_proj: bool, head_bias: bool,
                attn_shortcuts: list[bool] | None = None) -> None:
    """Make ``model.config`` (and class) describe a model sliced in place to residual width ``dim``."""
    cfg = model.config
    base = type(cfg).model_type
    config_cls, lm_cls = sliced_classes(base)
    if getattr(cfg, "head_dim", None) is None and hasattr(cfg, "num_attention_heads") and base != "opt":
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.llmprune_sliced_dim = int(dim)
    cfg.llmprune_sliced_shortcuts = [bool(s) for s in shortcuts]
    if attn_shortcuts is not None:
        cfg.llmprune_sliced_attn_shortcuts = [bool(s) for s in attn_shortcuts]
    cfg.llmprune_sliced_head_proj = bool(head_proj)
    cfg.llmprune_sliced_head_bias = bool(head_bias)
    cfg.__class__ = config_cls
    if "model_type" in vars(cfg):
        vars(cfg)["model_type"] = config_cls.model_type
    model.__class__ = lm_cls


def save_sliced(model, directory) -> None:
    """Same files as ``dense`` (plain safetensors); the config names ``sliced_<base>``."""
    model.save_pretrained(directory, safe_serialization=True)
