"""Bitmap-compressed KV cache with per-token magnitude pruning (Mustafar-style).

* :mod:`~llmprune.runtime.kvcache.cache`: :class:`BitmapKVCache` (one bitmap layer per full-attention layer,
  uniform or per-layer/per-head sparsities);
* :mod:`~llmprune.runtime.kvcache.layer`: :class:`BitmapKVLayer` (pruning schedule, dense window, choice of
  attention path);
* :mod:`~llmprune.runtime.kvcache.store`: the growing bitmap storage of one of K / V in one layer;
* :mod:`~llmprune.runtime.kvcache.attention`: the ``"llmprune_kv_bitmap"`` attention implementation.

The byte layout (:class:`BitmapTensor`, :func:`pack_bitmap` / :func:`unpack_bitmap`, :func:`keep_count`) lives in
:mod:`llmprune.formats.bitmap` and is re-exported here.
"""

from llmprune.formats.bitmap import (
    TILE,
    BitmapTensor,
    expected_ratio,
    keep_count,
    pack_bitmap,
    pack_topk,
    prune_topk,
    tile_masks,
    unpack_bitmap,
)
from llmprune.runtime.kvcache.attention import (
    ATTN_IMPL,
    bitmap_attention_forward,
    enable_kernel_attention,
    register_attention,
)
from llmprune.runtime.kvcache.cache import BitmapKVCache, BitmapKVLayer
from llmprune.runtime.kvcache.store import _BitmapStore

__all__ = [
    "ATTN_IMPL",
    "TILE",
    "BitmapKVCache",
    "BitmapKVLayer",
    "BitmapTensor",
    "_BitmapStore",
    "bitmap_attention_forward",
    "enable_kernel_attention",
    "expected_ratio",
    "keep_count",
    "pack_bitmap",
    "pack_topk",
    "prune_topk",
    "register_attention",
    "tile_masks",
    "unpack_bitmap",
]
