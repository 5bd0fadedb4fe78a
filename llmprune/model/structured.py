"""Models with per-layer sizes (structured pruning): config / model classes registered with transformers.

Structured pruning removes whole FFN channels (rows of ``gate_proj``/``up_proj``,
columns of ``down_proj``) and whole attention *head groups* (one KV head with the
query heads that share it: rows of ``q_proj``/``k_proj``/``v_proj``, columns of
``o_proj``), leaving a dense, smaller model. Supported: decoder layers with a gated
MLP (``mlp.gate_proj/up_proj/down_proj``) and ``self_attn.q/k/v/o_proj`` --
Llama, Mistral, Qwen2, Qwen3 and look-alikes.

Loading. transformers has no per-layer ``intermediate_size`` / head count for
Llama, Mistral or Qwen2 (only unrelated architectures such as Gemma-3n take a
list), so:

* **uniform** per-layer sizes are written into the ordinary config
  (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
  ``head_dim``): the checkpoint loads in plain transformers;
* **non-uniform** sizes switch the config to ``model_type = "llmprune_<base>"``
  (e.g. ``llmprune_llama``), a subclass of the base config that records
  ``llmprune_intermediate_sizes`` and ``llmprune_kv_heads`` per layer, and the model
  to a subclass of the base ``*ForCausalLM`` that shrinks its modules to those
  sizes on construction. ``import llmprune`` registers both with ``AutoConfig`` /
  ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(DIR)`` (and
  ``llmprune.load``) work; without llmprune, transformers refuses the unknown
  model type instead of loading wrong shapes. Weights stay plain safetensors.
"""

from __future__ import annotations

from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.model.access import attn_of, decoder_layers, intermediate_size, kv_heads, mlp_of

STRUCTURED_PREFIX = "llmprune_"
# base model_type -> (config class path, causal-LM class path) in transformers
_BASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
_STRUCTURED: dict[str, tuple[type, type]] = {}


def _resize_linear(lin: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    if lin.out_features == out_features and lin.in_features == in_features:
        return lin
    w = lin.weight
    return nn.Linear(in_features, out_features, bias=lin.bias is not None, device=w.device, dtype=w.dtype)


def resize_layers(model: nn.Module, intermediate_sizes: list[int], kv_head_counts: list[int]) -> None:
    """Shrink freshly built (uninitialised) layers to recorded per-layer sizes (for loading)."""
    layers = decoder_layers(model)
    if len(intermediate_sizes) != len(layers) or len(kv_head_counts) != len(layers):
        raise LlmpruneError(f"per-layer sizes list {len(intermediate_sizes)} entries for {len(layers)} layers")
    for layer, inter, kv in zip(layers, intermediate_sizes, kv_head_counts):
        mlp = mlp_of(layer)
        hidden = mlp.gate_proj.in_features
        mlp.gate_proj = _resize_linear(mlp.gate_proj, inter, hidden)
        mlp.up_proj = _resize_linear(mlp.up_proj, inter, hidden)
        mlp.down_proj = _resize_linear(mlp.down_proj, hidden, inter)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
        attn = attn_of(layer)
        hd = attn.head_dim
        n_rep = attn.q_proj.out_features // attn.k_proj.out_features
        attn.q_proj = _resize_linear(attn.q_proj, kv * n_rep * hd, hidden)
        attn.k_proj = _resize_linear(attn.k_proj, kv * hd, hidden)
        attn.v_proj = _resize_linear(attn.v_proj, kv * hd, hidden)
        attn.o_proj = _resize_linear(attn.o_proj, hidden, kv * n_rep * hd)


# --------------------------------------------------------------------------- config / classes


def check_layer_sizes(config) -> tuple[list[int] | None, list[int] | None]:
    """The per-layer sizes a ``llmprune_<base>`` config records, validated.

    Each of ``llmprune_intermediate_sizes`` / ``llmprune_kv_heads`` must be absent (both) or a list of positive
    ints, one per layer (``num_hidden_layers``); a KV head count may not exceed ``num_key_value_heads`` nor
    an FFN size exceed ``intermediate_size`` when those are recorded (structured pruning only removes).

    Returns:
        ``(intermediate sizes, KV heads)``, or ``(None, None)`` when the config records none.

    Raises:
        LlmpruneError: naming the field and the offending entry.
    """
    inter, kv = getattr(config, "llmprune_intermediate_sizes", None), getattr(config, "llmprune_kv_heads", None)
    if inter is None and kv is None:
        return None, None
    n_layers = getattr(config, "num_hidden_layers", None)
    out = []
    for field, value, limit in (("llmprune_intermediate_sizes", inter, getattr(config, "intermediate_size", None)),
                                ("llmprune_kv_heads", kv, getattr(config, "num_key_value_heads", None))):
        where = field
        if value is None:
            raise LlmpruneError(f"{where} is missing (it is recorded together with the other per-layer size list)")
        if not isinstance(value, (list, tuple)):
            raise LlmpruneError(f"{where} must be a list of positive integers, one per layer, got {value!r}")
        if isinstance(n_layers, int) and len(value) != n_layers:
            raise LlmpruneError(f"{where} has {len(value)} entries for {n_layers} layers")
        for i, v in enumerate(value):
            if type(v) is not int or v <= 0:
                raise LlmpruneError(f"{where}[{i}] must be a positive integer, got {v!r}")
            if type(limit) is int and limit > 0 and v > limit:
                raise LlmpruneError(f"{where}[{i}] = {v} exceeds the model's {limit}")
        out.append(list(value))
    return out[0], out[1]


def layer_sizes(model: nn.Module) -> tuple[list[int], list[int]]:
    """``(intermediate size, KV heads)`` of every decoder layer."""
    layers = decoder_layers(model)
    return [intermediate_size(layer) for layer in layers], [kv_heads(layer) for layer in layers]


def _base_classes(base_model_type: str, resizable: bool) -> tuple[type, type]:
    """transformers' ``(config class, causal-LM class)`` of a base model type.

    ``resizable``: the base must be one whose layers :func:`resize_layers` can shrink (:data:`_BASES`); otherwise
    any model type with a causal LM in transformers' auto mappings (packed checkpoints keep every size).
    """
    import transformers

    if base_model_type in _BASES:
        cfg_name, lm_name = _BASES[base_model_type]
        return getattr(transformers, cfg_name), getattr(transformers, lm_name)
    if resizable:
        raise LlmpruneError(
            f"non-uniform structured pruning of model type {base_model_type!r} is not supported "
            f"(supported: {', '.join(_BASES)}); use allocation='uniform'"
        )
    from transformers.models.auto import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        base_cfg = CONFIG_MAPPING[base_model_type]
        return base_cfg, MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    except KeyError:
        raise LlmpruneError(f"model type {base_model_type!r} has no causal LM in transformers") from None


def structured_classes(base_model_type: str, resizable: bool = True) -> tuple[type, type]:
    """``(config class, causal-LM class)`` for ``llmprune_<base>``, created and registered once.

    The same classes serve structured checkpoints with per-layer sizes and packed 2:4 checkpoints
    (:func:`needs_llmprune_config`): a model type plain transformers cannot resolve, so a checkpoint that needs
    llmprune is refused there instead of loading with missing or wrong weights.
    """
    if base_model_type in _STRUCTURED:
        if resizable and base_model_type not in _BASES:
            _base_classes(base_model_type, resizable)  # raises: registered for packing only
        return _STRUCTURED[base_model_type]
    from transformers import AutoConfig, AutoModelForCausalLM

    base_cfg, base_lm = _base_classes(base_model_type, resizable)
    cfg_name, lm_name = base_cfg.__name__, base_lm.__name__
    model_type = STRUCTURED_PREFIX + base_model_type
    title = "Llmprune" + lm_name

    config_cls = type(
        "Llmprune" + cfg_name,
        (base_cfg,),
        {"model_type": model_type, "__doc__": f"{cfg_name} with per-layer sizes (llmprune structured pruning)."},
    )

    def lm_init(self, config):
        inter, kv = check_layer_sizes(config)  # before building: bad sizes never reach torch
        base_lm.__init__(self, config)
        if inter is not None and kv is not None:
            resize_layers(self, inter, kv)

    lm_cls = type(
        title,
        (base_lm,),
        {"config_class": config_cls, "__init__": lm_init, "__doc__": f"{lm_name} with per-layer sizes."},
    )
    lm_cls.__module__ = config_cls.__module__ = __name__
    globals()[config_cls.__name__], globals()[lm_cls.__name__] = config_cls, lm_cls
    AutoConfig.register(model_type, config_cls)
    AutoModelForCausalLM.register(config_cls, lm_cls)
    _STRUCTURED[base_model_type] = (config_cls, lm_cls)
    return config_cls, lm_cls


def register_all() -> None:
    """Register ``llmprune_<base>`` for every supported base with transformers' auto classes."""
    for base in _BASES:
        structured_classes(base)


def base_model_type(config) -> str:
    mt = type(config).model_type
    return mt[len(STRUCTURED_PREFIX) :] if mt.startswith(STRUCTURED_PREFIX) else mt


def is_nonuniform(model: nn.Module) -> bool:
    """Whether ``model`` has per-layer sizes that only the ``llmprune_<base>`` classes describe."""
    return getattr(model.config, "llmprune_intermediate_sizes", None) is not None


def needs_llmprune_config(config_dict: dict) -> dict:
    """``config.json`` content that plain transformers refuses: ``model_type`` ``llmprune_<base>`` and the matching
    architecture name (for packed 2:4 checkpoints, whose linears transformers alone would fill at random).

    With ``import llmprune`` the type resolves to :func:`structured_classes` ``(base, resizable=False)``.
    """
    out = dict(config_dict)
    mt = str(out.get("model_type", ""))
    base = mt[len(STRUCTURED_PREFIX) :] if mt.startswith(STRUCTURED_PREFIX) else mt
    _, lm_cls = structured_classes(base, resizable=False)
    out["model_type"] = STRUCTURED_PREFIX + base
    out["architectures"] = [lm_cls.__name__]
    return out


def ensure_registered(model_type: str | None) -> None:
    """Register ``llmprune_<base>`` for a ``model_type`` read from a ``config.json`` (no-op for other types)."""
    if isinstance(model_type, str) and model_type.startswith(STRUCTURED_PREFIX):
        base = model_type[len(STRUCTURED_PREFIX) :]
        if base and base not in _STRUCTURED:
            structured_classes(base, resizable=False)


def plain_classes(model: nn.Module) -> None:
    """Give a model of class ``llmprune_<base>`` without per-layer sizes its base classes back (so it saves as a
    checkpoint plain transformers loads; e.g. after unpacking a packed 2:4 model)."""
    if type(model.config).model_type.startswith(STRUCTURED_PREFIX) and not is_nonuniform(model):
        base_cfg, base_lm = _base_classes(base_model_type(model.config), resizable=False)
        _set_class(model, base_cfg, base_lm)


def _set_class(model: nn.Module, config_cls: type, lm_cls: type) -> None:
    model.config.__class__ = config_cls
    if "model_type" in vars(model.config):  # configs read from disk may carry it per instance
        vars(model.config)["model_type"] = config_cls.model_type
    model.__class__ = lm_cls


def sync_config(model: nn.Module) -> None:
    """Make ``model.config`` (and class) describe the current layer sizes.

    Uniform sizes: the plain base config. Non-uniform: ``llmprune_<base>`` (see module doc).
    """
    inter, kv = layer_sizes(model)
    cfg = model.config
    base = base_model_type(cfg)
    head_dim = attn_of(decoder_layers(model)[0]).head_dim
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    if getattr(cfg, "head_dim", None) != head_dim:
        cfg.head_dim = head_dim
    if len(set(inter)) == 1 and len(set(kv)) == 1:
        if type(cfg).model_type.startswith(STRUCTURED_PREFIX):
            import transformers

            _set_class(model, getattr(transformers, _BASES[base][0]), getattr(transformers, _BASES[base][1]))
            for attr in ("llmprune_intermediate_sizes", "llmprune_kv_heads"):
                if hasattr(cfg, attr):
                    delattr(cfg, attr)
        cfg.intermediate_size = inter[0]
        cfg.num_key_value_heads = kv[0]
        cfg.num_attention_heads = kv[0] * n_rep
        return
    config_cls, lm_cls = structured_classes(base)
    if not type(cfg).model_type.startswith(STRUCTURED_PREFIX):
        _set_class(model, config_cls, lm_cls)
    cfg.llmprune_intermediate_sizes = list(inter)
    cfg.llmprune_kv_heads = list(kv)


# --------------------------------------------------------------------------- checkpoint format


def save_structured(model, directory) -> None:
    """Same files as ``dense``; the config names ``llmprune_<base>`` when per-layer sizes differ."""
    model.save_pretrained(directory, safe_serialization=True)

