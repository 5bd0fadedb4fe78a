"""One-pass emulation of the pruned bitmap KV cache, for calibration (per-layer / per-head keep counts).

:func:`llmprune.evaluate.perplexity.perplexity_with_cache` feeds a window through a real
:class:`~llmprune.runtime.kvcache.BitmapKVCache` in chunks of ``window`` tokens: query ``t`` attends to the tokens
``[0, window * floor(t / window))`` pruned (every key / value vector keeps its ``keep`` largest-magnitude entries
along ``head_dim``) and to ``[window * floor(t / window), t]`` dense. That needs ``seqlen / window`` forward passes.
The attention function here computes exactly the same attention in *one* causal forward pass over the whole
sequence: scores against pruned keys where the key is older than the query's chunk, against dense keys inside
it, and the same split for the values. Calibration (:mod:`llmprune.calibration.kv_sensitivity`) uses it to
measure, cheaply, what pruning one layer's keys or values costs end to end.

Use :func:`emulated_kv_cache` as a context manager: it registers the ``"llmprune_kv_emulate"`` attention
implementation with transformers, selects it on the model, and sets per-layer keep counts (layers without a
setting run plain dense attention). Only unpadded, position-0-based causal batches are supported (calibration
and perplexity windows), which is what the context manager is for.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from llmprune.formats.bitmap import prune_topk
from llmprune.model.access import attn_of, decoder_layers

#: Name of the attention implementation registered with transformers.
EMULATE_IMPL = "llmprune_kv_emulate"
#: Attribute of an attention module holding its ``(k_keeps, v_keeps, window)`` setting.
SPEC_ATTR = "_llmprune_kv_emulate"


def prune_heads(x: torch.Tensor, keeps: list[int] | None) -> torch.Tensor:
    """``x [B, H, T, d]`` with every vector of head ``h`` top-``keeps[h]`` magnitude pruned (None: unchanged)."""
    if keeps is None:
        return x
    d = x.shape[-1]
    if len(keeps) != x.shape[1]:
        raise ValueError(f"{len(keeps)} keep counts for {x.shape[1]} heads")
    if all(k >= d for k in keeps):
        return x
    return torch.stack([x[:, h] if k >= d else prune_topk(x[:, h], k) for h, k in enumerate(keeps)], dim=1)


def pruned_cache_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               k_keeps: list[int] | None, v_keeps: list[int] | None, window: int,
                               scaling: float | None = None) -> torch.Tensor:
    """Causal attention as seen through a chunked pruned cache (module doc), one pass.

    Args:
        query: ``[B, Hq, T, d]`` (positions ``0..T-1``).
        key, value: ``[B, Hkv, T, d]`` (keys after RoPE, as the cache stores them); ``Hq`` a multiple of ``Hkv``.
        k_keeps, v_keeps: entries kept per key / value vector for each KV head (None: dense).
        window: the cache's dense window (= chunk length).
        scaling: softmax scale (None: ``d ** -0.5``).

    Returns:
        ``[B, Hq, T, d]``.
    """
    B, Hq, T, d = query.shape
    g = Hq // key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    kp, vp = prune_heads(key, k_keeps), prune_heads(value, v_keeps)
    rep = functools.partial(torch.repeat_interleave, repeats=g, dim=1)
    pos = torch.arange(T, device=query.device)
    old = pos[None, :] < (pos[:, None] // window) * window  # [T(query), T(key)]: key lies in the pruned part
    causal = pos[None, :] <= pos[:, None]
    s = torch.where(old, query @ rep(kp).transpose(-1, -2), query @ rep(key).transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~causal, float("-inf")).float(), dim=-1).to(query.dtype)
    return (p * old) @ rep(vp) + (p * ~old) @ rep(value)


def emulate_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              **kwargs):
    """Attention function ``"llmprune_kv_emulate"``: the pruned-cache emulation where the module has a setting.

    Same signature and return as transformers' ``sdpa`` (``(output [B, q, Hq, d], None)``); modules without a
    setting (:data:`SPEC_ATTR`) run ``sdpa``.
    """
    spec = getattr(module, SPEC_ATTR, None)
    if spec is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("the KV cache emulation needs a full causal pass (no past key values)")
    k_keeps, v_keeps, window = spec
    out = pruned_cache_attention_ref(query, key, value, k_keeps, v_keeps, window, scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(EMULATE_IMPL, emulate_attention_forward)
    AttentionMaskInterface.register(EMULATE_IMPL, sdpa_mask)


class EmulatedCache:
    """Handle of :func:`emulated_kv_cache`: set or clear per-layer keep counts between forward passes."""

    def __init__(self, model: nn.Module, window: int) -> None:
        self.attns = [attn_of(layer) for layer in decoder_layers(model)]
        self.window = window

    def set(self, layer: int, k_keeps: list[int] | None, v_keeps: list[int] | None) -> None:
        """Prune layer ``layer``'s keys / values with these per-KV-head keep counts (None: dense)."""
        if k_keeps is None and v_keeps is None:
            self.clear(layer)
        else:
            setattr(self.attns[layer], SPEC_ATTR, (k_keeps, v_keeps, self.window))

    def clear(self, layer: int | None = None) -> None:
        """Dense attention in ``layer`` (None: every layer)."""
        for i, attn in enumerate(self.attns):
            if (layer is None or i == layer) and hasattr(attn, SPEC_ATTR):
                delattr(attn, SPEC_ATTR)


@contextlib.contextmanager
def emulated_kv_cache(model: nn.Module, window: int = 32) -> Iterator[EmulatedCache]:
    """Run ``model`` with the one-pass pruned-cache emulation; yields an :class:`EmulatedCache` (all dense first).

    The model's attention implementation and every per-layer setting are restored on exit.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    _register()
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    handle = EmulatedCache(model, window)
    config._attn_implementation = EMULATE_IMPL
    try:
        yield handle
    finally:
        handle.clear()
        config._attn_implementation = before
