"""``BitmapKVCache``: a transformers cache that prunes K/V per token and stores them as bitmaps.

One :class:`~llmprune.runtime.kvcache.layer.BitmapKVLayer` per full-attention layer (its module docstring
describes the pruning schedule and the torch / Triton attention paths); other layer types keep transformers' own
dense layers. Uniform sparsities or a per-layer, per-KV-head allocation
(:class:`~llmprune.runtime.kvcache.budgets.KVBudgets`).
"""

from __future__ import annotations

import functools
import logging

import torch

from llmprune.config import DEFAULT_KV_WINDOW
from llmprune.errors import ConfigError
from llmprune.formats.bitmap import keep_count
from llmprune.runtime.kernel_policy import check_backend, use_kernel
from llmprune.runtime.kvcache.attention import enable_kernel_attention
from llmprune.runtime.kvcache.budgets import resolve_allocation
from llmprune.runtime.kvcache.layer import BitmapKVLayer

try:  # transformers >= 4.56 has the layered cache API
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover
    Cache = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

#: ``k_sparsity`` when neither it nor an allocation is given.
DEFAULT_KV_SPARSITY = 0.7

__all__ = ["DEFAULT_KV_SPARSITY", "BitmapKVCache", "BitmapKVLayer"]


class BitmapKVCache(Cache):
    """KV cache that prunes K/V per token (top-k magnitude along ``head_dim``) and stores them as bitmaps.

    Use it as ``past_key_values`` of ``model.generate(...)`` or of a forward pass.

    Args:
        config: the model config (``model.config``); full-attention layers get a bitmap layer, other layer types
            (sliding window, linear attention) keep transformers' own dense layers.
        k_sparsity: fraction of each key vector pruned (``round(s * head_dim)`` entries), in [0, 1); default 0.7
            (or the allocation's mean).
        v_sparsity: same for values (default: ``k_sparsity``).
        window: recent tokens kept dense; compressed ``window`` at a time (``window * head_dim`` must be a
            multiple of 64). Default :data:`llmprune.config.DEFAULT_KV_WINDOW`.
        backend: kernel request, ``"auto"`` (Triton decode kernel on CUDA, torch elsewhere), ``"torch"`` (always
            dense reconstruction) or ``"triton"`` (kernel also on CPU under ``TRITON_INTERPRET=1``; for tests);
            see :mod:`llmprune.runtime.kernel_policy`.
        capacity: tokens per layer to preallocate (storage grows by doubling beyond it).
        allocation: ``None`` / ``"uniform"`` (every layer and head at ``k_sparsity`` / ``v_sparsity``), or
            per-layer, per-KV-head keep counts: a :class:`~llmprune.runtime.kvcache.budgets.KVBudgets`, its dict,
            or the path of a ``kv_budgets.json`` (``llmprune calibrate-kv``). Its K / V means must equal
            ``k_sparsity`` / ``v_sparsity`` when those are given (None: the allocation's means).

    Raises:
        ConfigError: on a sparsity outside [0, 1), a window below 1, an unknown backend, or an allocation whose
            means or layer count do not match.

    When the kernel may run on this machine it sets ``config._attn_implementation`` to ``"llmprune_kv_bitmap"``,
    which behaves as ``sdpa`` except for decode steps over this cache.
    """

    def __init__(
        self,
        config=None,
        k_sparsity: float | None = None,
        v_sparsity: float | None = None,
        window: int = DEFAULT_KV_WINDOW,
        backend: str = "auto",
        capacity: int = 0,
        allocation=None,
    ):
        budgets = resolve_allocation(allocation)
        if budgets is not None:
            for name, given, mean in (("k_sparsity", k_sparsity, budgets.k_sparsity),
                                      ("v_sparsity", v_sparsity if v_sparsity is not None else k_sparsity,
                                       budgets.v_sparsity)):
                if given is not None and abs(float(given) - mean) > 1e-9:
                    raise ConfigError(f"KV allocation has mean {name} {mean:g}, but {given:g} was asked for")
            k_sparsity, v_sparsity = budgets.k_sparsity, budgets.v_sparsity
        if k_sparsity is None:
            k_sparsity = DEFAULT_KV_SPARSITY
        v_sparsity = k_sparsity if v_sparsity is None else v_sparsity
        for s in (k_sparsity, v_sparsity):
            keep_count(64, s)  # validates
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"KV window must be an integer >= 1, got {window!r}")
        self.k_sparsity, self.v_sparsity, self.window = float(k_sparsity), float(v_sparsity), window
        self.budgets = budgets
        self.backend = check_backend(backend)
        make = functools.partial(BitmapKVLayer, self.k_sparsity, self.v_sparsity, window, self, capacity)
        self.attn_config = None
        if config is None:
            if budgets is not None:
                raise ConfigError("a non-uniform KV allocation needs the model config (BitmapKVCache(model.config, ...))")
            super().__init__(layer_class_to_replicate=make)
            return
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

        text_config = config.get_text_config(decoder=True)
        self.attn_config = text_config
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text_config)
        if budgets is not None and budgets.layers != len(layer_types):
            raise ConfigError(f"KV allocation has {budgets.layers} layers, the model {len(layer_types)}")
        layers = []
        for i, (lt, kw) in enumerate(zip(layer_types, per_layer_kwargs)):
            if lt == "full_attention":
                if budgets is None:
                    layers.append(make())
                else:
                    layers.append(make(k_keeps=budgets.k_keep[i], v_keeps=budgets.v_keep[i],
                                       head_dim=budgets.head_dim))
            else:
                log.warning("layer type %s keeps a dense %s cache", lt, DYNAMIC_LAYER_TYPE_MAPPING[lt].__name__)
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[lt](**kw))
        super().__init__(layers=layers)
        # The model's device is unknown here: switch the attention implementation if the kernel could run on
        # this machine's accelerator (or the interpreter); each step still checks its own layer's device.
        if use_kernel("cuda" if torch.cuda.is_available() else "cpu", requested=self.backend):
            enable_kernel_attention(text_config)

    def bitmap_layers(self) -> list[BitmapKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, BitmapKVLayer)]

    def flush(self) -> None:
        """Compress the full windows now (the next update would do it anyway; e.g. right after a prefill)."""
        for layer in self.bitmap_layers():
            if layer.is_initialized:
                layer._flush()

    def memory_report(self, element_size: int | None = None) -> dict:
        """Stored vs dense bytes over the bitmap layers (``element_size=2`` counts a 16-bit cache)."""
        stored = dense = 0
        compressed = window = 0
        for layer in self.bitmap_layers():
            s, d = layer.nbytes(element_size)
            stored, dense = stored + s, dense + d
            compressed, window = compressed + layer.compressed_tokens, window + layer.window_tokens
        n = max(1, len(self.bitmap_layers()))
        return {
            "stored_bytes": stored,
            "dense_bytes": dense,
            "ratio": stored / dense if dense else float("nan"),
            "compressed_tokens": compressed // n,
            "window_tokens": window // n,
        }

    def bytes(self, element_size: int | None = None) -> int:
        """Bytes of the compressed cache: bitmaps, tile metadata, kept values and the dense window."""
        return self.memory_report(element_size)["stored_bytes"]

    def dense_bytes(self, element_size: int | None = None) -> int:
        """Bytes a dense cache of the same tokens would take."""
        return self.memory_report(element_size)["dense_bytes"]

    def compression_ratio(self, element_size: int | None = None) -> float:
        """``bytes() / dense_bytes()``."""
        return self.memory_report(element_size)["ratio"]
