"""Model access: the only place that knows where decoder layers live.

Algorithms call :func:`decoder_layers` and :func:`linear_modules`; they never
reach into ``model.model.layers``. Llama, Mistral, Qwen2, Gemma, Phi-3 (all
``model.layers``) and OPT (``model.decoder.layers``) are covered by the table
below; other layouts are found by looking for the ``ModuleList`` whose length is
``config.num_hidden_layers``.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterable

from torch import nn

from llmprune.errors import LlmpruneError

# Paths from the *CausalLM* wrapper to its decoder ModuleList, most common first.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers
    "transformer.h",  # GPT-2 style, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
)

# Never pruned unless the user names them explicitly: output head, embeddings.
DEFAULT_IGNORE = ("lm_head", "*embed*", "*wte*", "*wpe*")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer ``ModuleList`` inside ``model``."""
    for path in _LAYER_PATHS:
        mod = _get(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n_layers and len(mod) == n_layers:
            return name
    raise LlmpruneError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {', '.join(_LAYER_PATHS)}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, in execution order."""
    return _get(model, decoder_layers_path(model))


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules inside one decoder layer, by relative name."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches any glob (``fnmatch``) or is equal/suffix to a pattern.

    ``"mlp.down_proj"`` matches ``model.layers.3.mlp.down_proj``; ``"*.31.*"``
    matches everything in layer 31.
    """
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or name == pat or name.endswith("." + pat):
            return True
    return False


def non_layer_modules(model: nn.Module) -> list[nn.Module]:
    """Modules outside the decoder stack: embeddings, final norm, rotary, head.

    These are what the calibration driver moves to the device to capture the
    inputs of the first decoder layer.
    """
    path = decoder_layers_path(model)
    parts = path.split(".")
    ancestors = [model] + [_get(model, ".".join(parts[: i + 1])) for i in range(len(parts) - 1)]
    layers = _get(model, path)
    skip = {id(m) for m in ancestors} | {id(layers)}
    out: list[nn.Module] = []
    for anc in ancestors:
        for child in anc.children():
            if id(child) not in skip:
                out.append(child)
    return out


def mlp_of(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        raise LlmpruneError(
            f"structured pruning needs a gated MLP (mlp.gate_proj/up_proj/down_proj); {type(layer).__name__} has none "
            "(supported: Llama, Mistral, Qwen2, Qwen3)"
        )
    return mlp


def attn_of(layer: nn.Module) -> nn.Module:
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise LlmpruneError(f"head pruning needs self_attn.q/k/v/o_proj; {type(layer).__name__} has none")
    return attn


#: The projections of a Llama-style decoder layer, as ``(submodule, attribute)`` under the layer.
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def projection_parents(layer: nn.Module) -> dict[str, nn.Module]:
    """``{"self_attn": module, "mlp": module}`` holding the :data:`PROJECTIONS` of ``layer``, whatever module type
    each projection is (``nn.Linear``, a packed 2:4 linear, ...)."""
    parents = {name: getattr(layer, name, None) for name in ("self_attn", "mlp")}
    missing = [f"{p}.{a}" for p, a in PROJECTIONS if parents[p] is None or getattr(parents[p], a, None) is None]
    if missing:
        raise LlmpruneError(f"{type(layer).__name__} has no {', '.join(missing)} (activation sparsity needs a "
                            "Llama-style layer: self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)")
    return parents


def intermediate_size(layer: nn.Module) -> int:
    return mlp_of(layer).gate_proj.out_features


def kv_heads(layer: nn.Module) -> int:
    attn = attn_of(layer)
    return attn.k_proj.out_features // attn.head_dim


def cache_argument(model) -> str:
    """The keyword under which ``model``'s ``forward``/``generate`` take the KV cache: ``cache`` in recent
    transformers (which deprecates ``past_key_values`` with a FutureWarning), ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``, by transformers version)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def hidden_size(config) -> int | None:
    """Width of the hidden states between decoder layers, from a ``transformers`` config."""
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
