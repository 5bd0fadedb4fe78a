"""Bitmap-compressed KV cache with per-token magnitude pruning (Mustafar-style).

Pruning
    Every cached key (and value) vector of one token and one KV head keeps its ``k`` largest-magnitude entries along
    ``head_dim`` (``k = head_dim - round(sparsity * head_dim)``; ties broken by :func:`torch.topk`) and zeros the
    rest. K and V have their own sparsity. The most recent tokens stay dense in a *window*; when the window holds
    ``window`` tokens or more, its oldest ``window * floor(len / window)`` tokens are pruned and compressed in one
    batch at the start of the next update. So in token-by-token decode, query ``t`` sees tokens
    ``[0, window * floor(t / window))`` pruned and ``[window * floor(t / window), t]`` dense; a prefill sees its own
    tokens dense (as in Mustafar), and they are compressed before the next step.

Bitmap layout (:class:`BitmapTensor`, per row; in the cache a row is one (batch, KV head) and its elements are the
flattened ``[tokens, head_dim]`` matrix, token-major)
    * the row is cut into fixed tiles of :data:`TILE` = 64 consecutive elements (with ``head_dim`` = 64 or 128 a
      tile is one token's vector or one half of it);
    * ``bitmap[..., t]`` (int64): bit ``i`` set <=> element ``64 t + i`` is kept;
    * ``values[..., :]``: the kept values of the row, in element order (tile by tile), padded with zeros to the
      longest row (cache rows all have ``tokens * k`` values, so there is no padding there);
    * ``offsets[..., t]`` (int32): index in ``values`` of tile ``t``'s first kept value (exclusive prefix sum of the
      tiles' popcounts), so a kernel reads any tile without a scan: element ``64 t + i``, if kept, is
      ``values[offsets[t] + popcount(bitmap[t] & ((1 << i) - 1))]``.

    Bytes per tile: 8 (bitmap) + 4 (offset) + kept * element size. For a 16-bit cache at 70% sparsity with
    ``head_dim`` 128 (38 of 128 kept) that is (2 * (8 + 4) + 38 * 2) / 256 = 39.1% of dense; with ``head_dim`` 64
    (19 of 64 kept) (12 + 38) / 128 = 39.1%.

Attention paths
    * torch (CPU, or whenever the kernel does not apply): :meth:`BitmapKVLayer.update` returns the dense
      reconstruction of the compressed tokens (pruned entries zero) followed by the dense window, so the model's own
      attention computes exactly attention over the pruned cache. The reconstruction is rebuilt at every step and
      freed after the layer (O(context) work per step, fine on CPU); the stored state stays compressed.
    * Triton (CUDA, ``head_dim`` in 64/128/256, fp16/bf16/fp32, at most :data:`MAX_KERNEL_QUERIES` new tokens):
      the cache switches the model config to the attention implementation ``"llmprune_kv_bitmap"`` (registered with
      transformers' ``AttentionInterface``; masks are made as for ``sdpa``). ``update`` then returns only the new
      tokens, tagged with the layer, and the attention function runs :func:`llmprune.kernels.kv_bitmap_attention`
      directly on the bitmap storage plus the dense window; no dense copy of the cache is ever built. Untagged calls
      (prefill, other caches) go to ``sdpa``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.sparsity import topk_mask

log = logging.getLogger(__name__)

#: Elements per bitmap tile (one int64 word of bitmap).
TILE = 64
#: Name of the attention implementation registered with transformers.
ATTN_IMPL = "llmprune_kv_bitmap"
#: The Triton decode kernel handles at most this many new query tokens per step; more goes to the torch path.
MAX_KERNEL_QUERIES = 16
_BIT = None  # lazily built [64] int64 tensor of bit positions, per device


# ---------------------------------------------------------------------------------------------------------------------
# pruning and the bitmap format
# ---------------------------------------------------------------------------------------------------------------------


def keep_count(head_dim: int, sparsity: float) -> int:
    """Entries kept per token and head: ``head_dim - round(sparsity * head_dim)`` (at least 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"KV sparsity must be a number in [0, 1), got {sparsity!r}")
    return max(1, head_dim - int(round(float(sparsity) * head_dim)))


def prune_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with all but the ``k`` largest-magnitude entries of each last-dim vector set to zero."""
    return x.masked_fill(~topk_mask(x, k), 0)


def _bit_positions(device) -> torch.Tensor:
    return torch.arange(TILE, dtype=torch.int64, device=device)


@dataclass
class BitmapTensor:
    """Rows of a tensor ``[*lead, length]`` stored as bitmap + offsets + packed kept values (layout: module doc)."""

    bitmap: torch.Tensor  # int64 [*lead, ntiles]
    offsets: torch.Tensor  # int32 [*lead, ntiles]
    values: torch.Tensor  # dtype [*lead, nvals]
    length: int  # elements per row

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.bitmap.shape[:-1], self.length)

    def nbytes(self, element_size: int | None = None) -> int:
        """Stored bytes: bitmap + offsets + values (values at ``element_size`` bytes each if given)."""
        es = self.values.element_size() if element_size is None else element_size
        return self.bitmap.numel() * 8 + self.offsets.numel() * 4 + self.values.numel() * es


def tile_masks(bitmap: torch.Tensor) -> torch.Tensor:
    """``[..., ntiles]`` int64 bitmap -> ``[..., ntiles, 64]`` bool keep mask."""
    return ((bitmap.unsqueeze(-1) >> _bit_positions(bitmap.device)) & 1).bool()


def pack_bitmap(x: torch.Tensor, mask: torch.Tensor | None = None) -> BitmapTensor:
    """Compress the rows (last dimension) of ``x`` keeping the entries where ``mask`` (default ``x != 0``) is set.

    Rows of any length are allowed (the last tile is padded with clear bits); rows with different kept counts are
    padded with zeros in ``values`` to the longest row. :func:`unpack_bitmap` inverts it exactly
    (``unpack(pack(x, m)) == x * m``).
    """
    if mask is None:
        mask = x != 0
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    *lead, n = x.shape
    ntiles = -(-n // TILE)
    pad = ntiles * TILE - n
    m = F.pad(mask, (0, pad)) if pad else mask
    bits = m.reshape(*lead, ntiles, TILE)
    # distinct powers of two: the sum is the bitwise OR (bit 63 wraps to the sign bit, which is what we want)
    bitmap = (bits.to(torch.int64) << _bit_positions(x.device)).sum(-1)
    per_tile = bits.sum(-1, dtype=torch.int32)
    offsets = (torch.cumsum(per_tile, -1, dtype=torch.int32) - per_tile).to(torch.int32)
    counts = per_tile.sum(-1)  # [*lead]
    nvals = int(counts.max()) if counts.numel() else 0
    if counts.numel() and bool((counts == nvals).all()):
        values = x[mask].reshape(*lead, nvals)
    else:
        values = x.new_zeros(*lead, nvals)
        valid = torch.arange(nvals, device=x.device) < counts.unsqueeze(-1)
        values[valid] = x[mask]
    return BitmapTensor(bitmap, offsets, values, n)


def unpack_bitmap(bt: BitmapTensor) -> torch.Tensor:
    """Dense ``[*lead, length]`` tensor of a :class:`BitmapTensor` (dropped entries are zero)."""
    *lead, ntiles = bt.bitmap.shape
    keep = tile_masks(bt.bitmap).reshape(*lead, ntiles * TILE)[..., : bt.length]
    out = bt.values.new_zeros(*lead, bt.length)
    nvals = bt.values.shape[-1]
    counts = keep.sum(-1)
    if counts.numel() and bool((counts == nvals).all()):
        out[keep] = bt.values.reshape(-1)
    else:
        valid = torch.arange(nvals, device=out.device) < counts.unsqueeze(-1)
        out[keep] = bt.values[valid]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# compressed storage of one of K / V in one layer
# ---------------------------------------------------------------------------------------------------------------------


class _BitmapStore:
    """Growing bitmap storage of ``[B, H, T, d]`` pruned to ``keep`` entries per token (rows = (b, h))."""

    def __init__(self, batch: int, heads: int, head_dim: int, keep: int, dtype, device, capacity: int = 0):
        self.B, self.H, self.d, self.keep = batch, heads, head_dim, keep
        self.tokens = 0
        self.n_tiles = 0
        self.n_vals = 0
        tiles_cap = capacity * head_dim // TILE
        self._bitmap = torch.zeros(batch, heads, tiles_cap, dtype=torch.int64, device=device)
        self._offsets = torch.zeros(batch, heads, tiles_cap, dtype=torch.int32, device=device)
        self._values = torch.zeros(batch, heads, capacity * keep, dtype=dtype, device=device)

    @staticmethod
    def _grow(buf: torch.Tensor, need: int) -> torch.Tensor:
        cap = buf.shape[-1]
        if need <= cap:
            return buf
        new = buf.new_zeros(*buf.shape[:-1], max(need, 2 * cap, 64))
        new[..., :cap] = buf
        return new

    def append(self, x: torch.Tensor, piece: int = 4096) -> None:
        """Prune ``x [B, H, T, d]`` (``T * d`` a multiple of 64) and append it (in pieces, to bound temporaries)."""
        for s in range(0, x.shape[2], piece):
            self._append(x[:, :, s : s + piece])

    def _pack(self, x: torch.Tensor) -> BitmapTensor:
        """:func:`pack_bitmap` of the per-token top-k, without a host sync (every token keeps exactly ``keep``)."""
        B, H, T, d = x.shape
        if self.keep == d:
            idx = torch.arange(d, device=x.device).expand(B, H, T, d)
        else:
            idx = x.abs().topk(self.keep, dim=-1, sorted=False).indices.sort(dim=-1).values
        values = x.gather(-1, idx).reshape(B, H, T * self.keep)  # element order within each token
        mask = torch.zeros(B, H, T, d, dtype=torch.bool, device=x.device).scatter_(-1, idx, True)
        bits = mask.reshape(B, H, T * d // TILE, TILE)
        bitmap = (bits.to(torch.int64) << _bit_positions(x.device)).sum(-1)
        per_tile = bits.sum(-1, dtype=torch.int32)
        offsets = (torch.cumsum(per_tile, -1, dtype=torch.int32) - per_tile).to(torch.int32)
        return BitmapTensor(bitmap, offsets, values, T * d)

    def _append(self, x: torch.Tensor) -> None:
        bt = self._pack(x)
        T = x.shape[2]
        nt, nv = bt.bitmap.shape[-1], bt.values.shape[-1]
        self._bitmap = self._grow(self._bitmap, self.n_tiles + nt)
        self._offsets = self._grow(self._offsets, self.n_tiles + nt)
        self._values = self._grow(self._values, self.n_vals + nv)
        self._bitmap[..., self.n_tiles : self.n_tiles + nt] = bt.bitmap
        self._offsets[..., self.n_tiles : self.n_tiles + nt] = bt.offsets + self.n_vals
        self._values[..., self.n_vals : self.n_vals + nv] = bt.values
        self.tokens += T
        self.n_tiles += nt
        self.n_vals += nv

    @property
    def bitmap(self) -> torch.Tensor:
        return self._bitmap[..., : self.n_tiles]

    @property
    def offsets(self) -> torch.Tensor:
        return self._offsets[..., : self.n_tiles]

    @property
    def values(self) -> torch.Tensor:
        return self._values[..., : self.n_vals]

    def as_bitmap_tensor(self) -> BitmapTensor:
        return BitmapTensor(self.bitmap, self.offsets, self.values, self.tokens * self.d)

    def dense(self) -> torch.Tensor:
        """``[B, H, tokens, d]`` reconstruction (pruned entries zero)."""
        if self.tokens == 0:
            return self._values.new_zeros(self.B, self.H, 0, self.d)
        return unpack_bitmap(self.as_bitmap_tensor()).view(self.B, self.H, self.tokens, self.d)

    def nbytes(self, element_size: int) -> int:
        return self.B * self.H * (self.n_tiles * 12 + self.n_vals * element_size)

    def index_batch(self, idx: torch.Tensor) -> None:
        self._bitmap = self._bitmap.index_select(0, idx)
        self._offsets = self._offsets.index_select(0, idx)
        self._values = self._values.index_select(0, idx)
        self.B = self._values.shape[0]


# ---------------------------------------------------------------------------------------------------------------------
# transformers cache
# ---------------------------------------------------------------------------------------------------------------------

try:  # transformers >= 4.56 has the layered cache API
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover
    Cache = CacheLayerMixin = object  # type: ignore[assignment,misc]


class BitmapKVLayer(CacheLayerMixin):
    """One attention layer's cache: bitmap-compressed pruned K/V plus a dense window of recent tokens."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, k_sparsity: float, v_sparsity: float, window: int, owner=None, capacity: int = 0):
        super().__init__()
        self.k_sparsity, self.v_sparsity, self.window = k_sparsity, v_sparsity, window
        self.owner = owner
        self.capacity = capacity
        self.k_store: _BitmapStore | None = None
        self.v_store: _BitmapStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, d = key_states.shape
        if (self.window * d) % TILE:
            raise LlmpruneError(f"KV window ({self.window}) x head_dim ({d}) must be a multiple of {TILE}")
        if value_states.shape[-1] != d:
            raise LlmpruneError("BitmapKVCache needs the same head_dim for keys and values")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = d
        self.k_keep = keep_count(d, self.k_sparsity)
        self.v_keep = keep_count(d, self.v_sparsity)
        cap = self.capacity
        self.k_store = _BitmapStore(B, H, d, self.k_keep, self.dtype, self.device, cap)
        self.v_store = _BitmapStore(B, H, d, self.v_keep, self.dtype, self.device, cap)
        self.keys = key_states[:, :, :0]  # the dense window
        self.values = value_states[:, :, :0]
        self.is_initialized = True

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
        self.k_store.append(self.keys[:, :, :n])
        self.v_store.append(self.values[:, :, :n])
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()

    def _kernel_applies(self, q_len: int) -> bool:
        owner = self.owner
        if owner is None or owner.backend == "torch" or q_len > MAX_KERNEL_QUERIES:
            return False
        if getattr(owner.attn_config, "_attn_implementation", None) != ATTN_IMPL:
            return False
        d = self.head_dim
        if d not in (64, 128, 256) or self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        return self.device.type == "cuda" or (owner.backend == "triton" and interpret)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        q_len = key_states.shape[-2]
        if self._kernel_applies(q_len):
            # Tagged new-token views: the registered attention function recognises them and attends over storage.
            k_tag, v_tag = key_states.view(key_states.shape), value_states.view(value_states.shape)
            k_tag._llmprune_bitmap_layer = self
            return k_tag, v_tag
        if self.compressed_tokens == 0:
            return self.keys, self.values
        return (
            torch.cat([self.k_store.dense(), self.keys], dim=-2),
            torch.cat([self.v_store.dense(), self.values], dim=-2),
        )

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
        """Decode attention of ``query [B, Hq, q, d]`` over this layer's storage with the Triton kernel."""
        from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention

        kv_mask = None
        if attention_mask is not None:
            row = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
            kv_mask = row if row.dtype == torch.bool else row == 0
            kv_mask = kv_mask[:, : self.get_seq_length()]
        ks, vs = self.k_store, self.v_store
        return kv_bitmap_attention(
            query, ks.bitmap, ks.offsets, ks.values, vs.bitmap, vs.offsets, vs.values, self.keys, self.values,
            ks.tokens, scale=scaling, kv_mask=kv_mask,
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
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BitmapKVCache cannot be cropped (pruned entries are gone)")

    def _index_batch(self, idx: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = idx.to(self.device)
        self.k_store.index_batch(idx)
        self.v_store.index_batch(idx)
        self.keys = self.keys.index_select(0, idx)
        self.values = self.values.index_select(0, idx)

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


class BitmapKVCache(Cache):
    """KV cache that prunes K/V per token (top-k magnitude along ``head_dim``) and stores them as bitmaps.

    Use it as ``past_key_values`` of ``model.generate(...)`` or of a forward pass.

    Args:
        config: the model config (``model.config``); full-attention layers get a bitmap layer, other layer types
            (sliding window, linear attention) keep transformers' own dense layers.
        k_sparsity: fraction of each key vector pruned (``round(s * head_dim)`` entries), in [0, 1).
        v_sparsity: same for values (default: ``k_sparsity``).
        window: recent tokens kept dense; compressed ``window`` at a time (``window * head_dim`` must be a
            multiple of 64).
        backend: ``"auto"`` (Triton decode kernel on CUDA, torch elsewhere), ``"torch"`` (always dense
            reconstruction), ``"triton"`` (kernel also on CPU under ``TRITON_INTERPRET=1``; for tests).
        capacity: tokens per layer to preallocate (storage grows by doubling beyond it).

    On CUDA (``backend`` auto/triton) it sets ``config._attn_implementation`` to ``"llmprune_kv_bitmap"``, which
    behaves as ``sdpa`` except for decode steps over this cache.
    """

    def __init__(
        self,
        config=None,
        k_sparsity: float = 0.7,
        v_sparsity: float | None = None,
        window: int = 32,
        backend: str = "auto",
        capacity: int = 0,
    ):
        v_sparsity = k_sparsity if v_sparsity is None else v_sparsity
        for s in (k_sparsity, v_sparsity):
            keep_count(64, s)  # validates
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"KV window must be an integer >= 1, got {window!r}")
        if backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"backend must be auto, torch or triton, got {backend!r}")
        self.k_sparsity, self.v_sparsity, self.window, self.backend = float(k_sparsity), float(v_sparsity), window, backend
        make = functools.partial(BitmapKVLayer, self.k_sparsity, self.v_sparsity, window, self, capacity)
        self.attn_config = None
        if config is None:
            super().__init__(layer_class_to_replicate=make)
        else:
            from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

            text_config = config.get_text_config(decoder=True)
            self.attn_config = text_config
            layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text_config)
            layers = []
            for lt, kw in zip(layer_types, per_layer_kwargs):
                if lt == "full_attention":
                    layers.append(make())
                else:
                    log.warning("layer type %s keeps a dense %s cache", lt, DYNAMIC_LAYER_TYPE_MAPPING[lt].__name__)
                    layers.append(DYNAMIC_LAYER_TYPE_MAPPING[lt](**kw))
            super().__init__(layers=layers)
            if backend == "triton" or (backend == "auto" and torch.cuda.is_available()):
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
        """Bytes of the compressed cache: bitmaps + offsets + kept values + the dense window."""
        return self.memory_report(element_size)["stored_bytes"]

    def dense_bytes(self, element_size: int | None = None) -> int:
        """Bytes a dense cache of the same tokens would take."""
        return self.memory_report(element_size)["dense_bytes"]

    def compression_ratio(self, element_size: int | None = None) -> float:
        """``bytes() / dense_bytes()``."""
        return self.memory_report(element_size)["ratio"]


def expected_ratio(head_dim: int, k_sparsity: float, v_sparsity: float | None = None, element_size: int = 2) -> float:
    """Stored/dense bytes of the compressed part alone (no window), from the format."""
    v_sparsity = k_sparsity if v_sparsity is None else v_sparsity
    tiles = head_dim / TILE
    per_tok = sum(tiles * 12 + keep_count(head_dim, s) * element_size for s in (k_sparsity, v_sparsity))
    return per_tok / (2 * head_dim * element_size)


# ---------------------------------------------------------------------------------------------------------------------
# attention implementation for transformers
# ---------------------------------------------------------------------------------------------------------------------


def bitmap_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention function registered as ``"llmprune_kv_bitmap"``: Triton over the bitmap cache, else ``sdpa``."""
    layer = getattr(key, "_llmprune_bitmap_layer", None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = layer.attend(query, attention_mask, scaling)  # [B, Hq, q, d]
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register_attention() -> None:
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
