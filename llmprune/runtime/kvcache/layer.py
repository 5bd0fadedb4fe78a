"""``BitmapKVLayer``: one layer of :class:`~llmprune.runtime.kvcache.cache.BitmapKVCache` (pruned K/V as bitmaps).

Pruning schedule
    Every cached key (and value) vector of one token and one KV head keeps its ``k`` largest-magnitude entries
    along ``head_dim`` (:func:`~llmprune.formats.bitmap.keep_count`; K and V have their own sparsity). The most
    recent tokens stay dense in a *window*; when the window holds ``window`` tokens or more, its oldest
    ``window * floor(len / window)`` tokens are pruned and compressed in one batch at the start of the next
    update. So in token-by-token decode, query ``t`` sees tokens ``[0, window * floor(t / window))`` pruned and
    ``[window * floor(t / window), t]`` dense; a prefill sees its own tokens dense (as in Mustafar), and they are
    compressed before the next step.

Attention paths (chosen per step by :mod:`llmprune.runtime.kernel_policy` and the kernel's shape limits)
    * torch: :meth:`BitmapKVLayer.update` returns the dense reconstruction of the compressed tokens (pruned
      entries zero) followed by the dense window, so the model's own attention computes exactly attention over
      the pruned cache. On a layer where the kernel cannot run (CPU, unsupported head dim or dtype) the layer
      keeps that reconstruction as a *mirror*: a dense working buffer, grown by doubling, into which each flush
      writes only the tokens it just compressed (decompressed from a bitmap of those tokens alone) and each step
      writes its new tokens, so a decode step costs O(new tokens) instead of decompressing the whole store. The
      mirror is a CPU-path working buffer, not the cache: :meth:`BitmapKVLayer.nbytes` and
      :meth:`BitmapKVCache.memory_report` count the compressed store and the window only
      (:meth:`BitmapKVLayer.mirror_nbytes` reports the buffer). Elsewhere (a multi-token step on a kernel
      layer, or a step that needs gradients) the reconstruction is rebuilt from the whole store for that step.
    * Triton (``head_dim`` in 64/128/256, fp16/bf16/fp32, at most
      :data:`~llmprune.runtime.kernel_policy.KV_BITMAP_MAX_QUERIES` new tokens): the cache switches the model
      config to the ``"llmprune_kv_bitmap"`` attention implementation (:mod:`.attention`). ``update`` then
      returns only the new tokens, tagged with the layer, and the attention function runs
      :func:`llmprune.kernels.kv_bitmap_attention.kv_bitmap_attention` directly on the bitmap storage plus the
      dense window; no dense copy of the cache is ever built.
"""

from __future__ import annotations

import logging

import torch

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.bitmap import TILE, keep_count
from llmprune.runtime.kernel_policy import KV_BITMAP_MAX_QUERIES, use_kernel
from llmprune.runtime.kvcache.attention import ATTN_IMPL, LAYER_TAG
from llmprune.runtime.kvcache.mirror import DenseMirror
from llmprune.runtime.kvcache.store import _BitmapStore

try:  # transformers >= 4.56 has the layered cache API
    from transformers.cache_utils import CacheLayerMixin
except ImportError:  # pragma: no cover
    CacheLayerMixin = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

#: Head dims and dtypes the decode kernel is built for.
_KERNEL_HEAD_DIMS = (64, 128, 256)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BitmapKVLayer(CacheLayerMixin):
    """One attention layer's cache: bitmap-compressed pruned K/V plus a dense window of recent tokens.

    Args:
        k_sparsity, v_sparsity: fractions of each key / value vector pruned.
        window: recent tokens kept dense (compressed ``window`` at a time).
        owner: the :class:`BitmapKVCache` (its ``backend`` and model config decide the attention path).
        capacity: tokens to preallocate in each store.
        k_keeps, v_keeps: per-KV-head keep counts (from a :class:`~llmprune.runtime.kvcache.budgets.KVBudgets`),
            replacing the sparsities; None = ``keep_count(head_dim, sparsity)`` for every head.
        head_dim: the head dim the keep counts were made for (checked against the first update).

    On a layer where the decode kernel cannot run, the torch path keeps ``mirror``, a
    :class:`~llmprune.runtime.kvcache.mirror.DenseMirror` of the pruned cache (the reconstruction of the
    compressed tokens, then the window). It is a working buffer of the torch path (as large as a dense cache),
    not part of the cache's reported bytes (:meth:`nbytes`).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, k_sparsity: float, v_sparsity: float, window: int, owner=None, capacity: int = 0,
                 k_keeps: list[int] | None = None, v_keeps: list[int] | None = None, head_dim: int | None = None):
        super().__init__()
        self.k_sparsity, self.v_sparsity, self.window = k_sparsity, v_sparsity, window
        self.owner = owner
        self.capacity = capacity
        self.k_keeps, self.v_keeps, self.budget_head_dim = k_keeps, v_keeps, head_dim
        self.k_store: _BitmapStore | None = None
        self.v_store: _BitmapStore | None = None
        self.mirror: DenseMirror | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, d = key_states.shape
        if (self.window * d) % TILE:
            raise LlmpruneError(f"KV window ({self.window}) x head_dim ({d}) must be a multiple of {TILE}")
        if value_states.shape[-1] != d:
            raise LlmpruneError("BitmapKVCache needs the same head_dim for keys and values")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = d
        if self.k_keeps is not None:
            if self.budget_head_dim != d or len(self.k_keeps) != H or len(self.v_keeps) != H:
                raise ConfigError(f"KV allocation is for {len(self.k_keeps)} KV heads of head_dim "
                                  f"{self.budget_head_dim}; this layer has {H} heads of head_dim {d}")
            self.k_keep = self.k_keeps if len(set(self.k_keeps)) > 1 else self.k_keeps[0]
            self.v_keep = self.v_keeps if len(set(self.v_keeps)) > 1 else self.v_keeps[0]
        else:
            self.k_keep = keep_count(d, self.k_sparsity)
            self.v_keep = keep_count(d, self.v_sparsity)
        cap = self.capacity
        self.k_store = _BitmapStore(B, H, d, self.k_keep, self.dtype, self.device, cap)
        self.v_store = _BitmapStore(B, H, d, self.v_keep, self.dtype, self.device, cap)
        self.keys = key_states[:, :, :0]  # the dense window
        self.values = value_states[:, :, :0]
        self.is_initialized = True
        # Decided once: where a decode step can take the kernel, no dense mirror is kept (it would cost a
        # dense cache's memory on the accelerator).
        self.mirror = None if self._kernel_applies(1) else DenseMirror(d, self.dtype, self.device, cap)

    # -- state ------------------------------------------------------------------------------------------------------
    @property
    def compressed_tokens(self) -> int:
        return self.k_store.tokens if self.is_initialized else 0

    @property
    def window_tokens(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.compressed_tokens + self.window_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _flush(self) -> None:
        """Compress the oldest ``window * floor(len / window)`` window tokens."""
        n = (self.window_tokens // self.window) * self.window
        if n == 0:
            return
        start = self.compressed_tokens
        self.k_store.append(self.keys[:, :, :n])
        self.v_store.append(self.values[:, :, :n])
        if self.mirror is not None:  # the flushed tokens' slots now hold their pruned reconstruction
            self.mirror.write(start, self._pruned(self.keys[:, :, :n], self.k_keep),
                               self._pruned(self.values[:, :, :n], self.v_keep))
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()

    def _pruned(self, x: torch.Tensor, keep) -> torch.Tensor:
        """``x [B, H, n, d]`` as the store holds it once appended: packed alone and unpacked (pruned entries
        zero). Pruning is per token, so this equals those tokens' slice of the whole store's ``dense()``."""
        store = _BitmapStore(x.shape[0], x.shape[1], self.head_dim, keep, self.dtype, self.device, x.shape[2])
        store.append(x)
        return store.dense()

    def mirror_nbytes(self) -> int:
        """Bytes of the torch path's dense mirror (0 when none is kept); not counted in :meth:`nbytes`."""
        return 0 if self.mirror is None else self.mirror.nbytes()

    def _kernel_applies(self, q_len: int) -> bool:
        owner = self.owner
        if owner is None or q_len > KV_BITMAP_MAX_QUERIES:
            return False
        # Only the registered attention function understands the tagged new-token views update() returns.
        if getattr(owner.attn_config, "_attn_implementation", None) != ATTN_IMPL:
            return False
        if self.head_dim not in _KERNEL_HEAD_DIMS or self.dtype not in _KERNEL_DTYPES:
            return False
        return use_kernel(self.device, requested=owner.backend)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add ``[B, H, q, d]`` new keys / values; returns what the attention function should attend over.

        Returns:
            ``(keys, values)``: on the torch path the dense ``[B, H, T, d]`` reconstruction of the whole cache;
            on the kernel path the new tokens only, the key view tagged with this layer.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        start = self.get_seq_length()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.mirror is not None:
            self.mirror.write(start, key_states, value_states)
        if self._kernel_applies(key_states.shape[-2]):
            k_tag, v_tag = key_states.view(key_states.shape), value_states.view(value_states.shape)
            setattr(k_tag, LAYER_TAG, self)
            return k_tag, v_tag
        if self.compressed_tokens == 0:
            return self.keys, self.values
        if self.mirror is not None and not (torch.is_grad_enabled() and key_states.requires_grad):
            return self.mirror.view(self.get_seq_length())  # valid for this step (flushes rewrite slots)
        return (
            torch.cat([self.k_store.dense(), self.keys], dim=-2),
            torch.cat([self.v_store.dense(), self.values], dim=-2),
        )

    # -- bookkeeping ----------------------------------------------------------------------------------------------------
    def nbytes(self, element_size: int | None = None) -> tuple[int, int]:
        """``(stored bytes, dense-cache bytes)`` of this layer; element size defaults to the cache dtype's."""
        if not self.is_initialized:
            return 0, 0
        es = self.keys.element_size() if element_size is None else element_size
        B, H = self.keys.shape[:2]
        window = 2 * B * H * self.window_tokens * self.head_dim * es
        stored = self.k_store.nbytes(es) + self.v_store.nbytes(es) + window
        dense = 2 * B * H * self.get_seq_length() * self.head_dim * es
        return stored, dense

    def reset(self) -> None:
        self.k_store = self.v_store = None
        self.keys = self.values = None
        self.mirror = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        # Not supported, so the mirror never has to shrink.
        raise NotImplementedError("BitmapKVCache cannot be cropped (pruned entries are gone)")

    def _index_batch(self, idx: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = idx.to(self.device)
        self.k_store.index_batch(idx)
        self.v_store.index_batch(idx)
        self.keys = self.keys.index_select(0, idx)
        self.values = self.values.index_select(0, idx)
        if self.mirror is not None:
            self.mirror.index_batch(idx, self.get_seq_length())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.keys.shape[0]
            self._index_batch(torch.arange(B, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = indices if indices.dtype != torch.bool else indices.nonzero().flatten()
            self._index_batch(idx.to(torch.long))

    def offload(self):  # pragma: no cover - offloading is not supported
        pass

    def prefetch(self):  # pragma: no cover
        pass
