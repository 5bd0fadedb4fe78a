"""The ``"llmprune_kv_bitmap"`` attention implementation: Triton decode over a ``BitmapKVCache``, else ``sdpa``.

``BitmapKVLayer.update`` tags the new-token key view it returns with the layer when the kernel applies; the
attention function recognises the tag and runs the kernel over the layer's bitmap storage
(:func:`attend_layer`). Untagged calls (prefill, other caches) are plain ``sdpa``, and masks are built exactly
as for ``sdpa``.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

#: Name of the attention implementation registered with transformers.
ATTN_IMPL = "llmprune_kv_bitmap"
#: Attribute set on the tagged key view; holds the ``BitmapKVLayer`` to attend over.
LAYER_TAG = "_llmprune_bitmap_layer"


def bitmap_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention function registered as ``"llmprune_kv_bitmap"`` (same signature as transformers' ``sdpa``).

    Args:
        module: the attention module.
        query: ``[B, Hq, q, d]``.
        key, value: ``[B, Hkv, T, d]``, or the tagged ``[B, Hkv, q, d]`` new tokens of a bitmap layer.
        attention_mask: the ``sdpa`` mask, or None.

    Returns:
        ``(output [B, q, Hq, d], None)``.
    """
    layer = getattr(key, LAYER_TAG, None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = attend_layer(layer, query, attention_mask, scaling)  # [B, Hq, q, d]
    return out.transpose(1, 2).contiguous(), None


def attend_layer(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """Decode attention of ``query [B, Hq, q, d]`` over a ``BitmapKVLayer``'s storage with the Triton kernel.

    Args:
        layer: the ``BitmapKVLayer`` (its bitmap stores hold the compressed tokens, ``keys`` / ``values`` the
            dense window ending with the ``q`` new tokens).
        query: ``[B, Hq, q, d]``.
        attention_mask: the ``sdpa`` mask (``[B, 1, q, T]`` float or bool, or ``[B, T]``), or None.
        scaling: softmax scale (None: ``d ** -0.5``).

    Returns:
        ``[B, Hq, q, d]`` in ``query.dtype``.
    """
    # Imported on first use: triton's @jit picks compiled vs interpreted when the kernel module loads.
    from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention

    kv_mask = None
    if attention_mask is not None:
        # The last query row of the mask is the widest; the kernel applies causality among new tokens itself.
        row = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
        kv_mask = row if row.dtype == torch.bool else row == 0
        kv_mask = kv_mask[:, : layer.get_seq_length()]
    ks, vs = layer.k_store, layer.v_store
    return kv_bitmap_attention(
        query, ks.bitmap, ks.offsets, ks.values, vs.bitmap, vs.offsets, vs.values, layer.keys, layer.values,
        ks.tokens, scale=scaling, kv_mask=kv_mask,
    )


@functools.cache
def register_attention() -> None:
    """Register :func:`bitmap_attention_forward` (and the ``sdpa`` mask) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, bitmap_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def enable_kernel_attention(model_or_config) -> None:
    """Register ``"llmprune_kv_bitmap"`` with transformers and select it on the model (or config)."""
    register_attention()
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "_attn_implementation", None) != ATTN_IMPL:
        log.info("attention implementation %s -> %s", getattr(config, "_attn_implementation", None), ATTN_IMPL)
        config._attn_implementation = ATTN_IMPL
