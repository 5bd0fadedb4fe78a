"""The bitmap byte layout of compressed KV-cache rows: :func:`pack_bitmap` / :func:`unpack_bitmap`.

Layout (:class:`BitmapTensor`, per row; in the KV cache a row is one (batch, KV head) and its elements are the
flattened ``[tokens, head_dim]`` matrix, token-major):

* the row is cut into fixed tiles of :data:`TILE` = 64 consecutive elements (with ``head_dim`` = 64 or 128 a
  tile is one token's vector or one half of it);
* ``bitmap[..., t]`` (int64): bit ``i`` set <=> element ``64 t + i`` is kept;
* ``values[..., :]``: the kept values of the row, in element order (tile by tile), padded with zeros to the
  longest row (cache rows all have ``tokens * k`` values, so there is no padding there);
* ``offsets[..., t]`` (int32, format version 1 only): index in ``values`` of tile ``t``'s first kept value
  (exclusive prefix sum of the tiles' popcounts): element ``64 t + i``, if kept, is
  ``values[offsets[t] + popcount(bitmap[t] & ((1 << i) - 1))]``.

Format version 2 (:data:`FORMAT_VERSION`, the KV cache's rows when every head keeps the same ``k``): every token
keeps exactly ``k`` values, so the offsets are derivable and not stored: token ``n``'s kept values are
``values[n * k : (n + 1) * k]`` and element ``i`` of tile ``t`` of the token, if kept, is
``values[n * k + popcount(earlier tiles of the token) + popcount(bitmap[t] & ((1 << i) - 1))]``
(:func:`token_offsets`). The decode kernel reads a block of tokens' values as one contiguous run of 16-byte
vectors. Version 1 rows (stored offsets) remain readable everywhere; the cache still writes them for per-head
keep counts, whose heads share one values buffer.

Bytes per tile: 8 (bitmap) + kept * element size, plus 4 (offset) in version 1. For a 16-bit cache at 70% sparsity
with ``head_dim`` 128 (38 of 128 kept) that is (2 * 8 + 38 * 2) / 256 = 35.9% of dense (39.1% with offsets); with
``head_dim`` 64 (19 of 64 kept) (8 + 38) / 128 = 35.9%.

Pruning rule (:func:`keep_count`, :func:`prune_topk`, :func:`pack_topk`): each ``head_dim`` vector keeps its
``k = head_dim - round(sparsity * head_dim)`` largest-magnitude entries.

This module is the bottom of the stack: the Triton decode kernel (:mod:`llmprune.kernels.kv_bitmap_attention`)
and the cache (:mod:`llmprune.runtime.kvcache`) both read the layout through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmprune.errors import ConfigError
from llmprune.sparsity import topk_mask

#: Elements per bitmap tile (one int64 word of bitmap).
TILE = 64
#: Bytes of per-tile metadata in format version 1: the int64 bitmap word and the int32 offset.
TILE_META_BYTES = 8 + 4
#: Bytes of per-tile metadata in format version 2 (offsets derived, not stored): the int64 bitmap word.
TILE_WORD_BYTES = 8
#: The layout version the KV cache writes for rows with one keep count per token (see the module doc).
FORMAT_VERSION = 2


def keep_count(head_dim: int, sparsity: float) -> int:
    """Entries kept per token and head: ``head_dim - round(sparsity * head_dim)`` (at least 1).

    Raises:
        ConfigError: if ``sparsity`` is not a number in [0, 1).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"KV sparsity must be a number in [0, 1), got {sparsity!r}")
    return max(1, head_dim - int(round(float(sparsity) * head_dim)))


def prune_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x [..., d]`` with all but the ``k`` largest-magnitude entries of each last-dim vector set to zero."""
    return x.masked_fill(~topk_mask(x, k), 0)


def expected_ratio(head_dim: int, k_sparsity: float, v_sparsity: float | None = None, element_size: int = 2,
                   version: int = FORMAT_VERSION) -> float:
    """Stored / dense bytes of the compressed part of a KV cache alone (no dense window), from the layout
    (``version`` 1: with stored offsets)."""
    v_sparsity = k_sparsity if v_sparsity is None else v_sparsity
    meta = _tile_meta_bytes(version)
    tiles = head_dim / TILE
    per_tok = sum(tiles * meta + keep_count(head_dim, s) * element_size for s in (k_sparsity, v_sparsity))
    return per_tok / (2 * head_dim * element_size)


def _tile_meta_bytes(version: int) -> int:
    if version not in (1, 2):
        raise ValueError(f"bitmap format version must be 1 or 2, got {version!r}")
    return TILE_META_BYTES if version == 1 else TILE_WORD_BYTES


@dataclass
class BitmapTensor:
    """Rows of a tensor ``[*lead, length]`` stored as bitmap + offsets + packed kept values (see module doc)."""

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


def _bit_positions(device) -> torch.Tensor:
    return torch.arange(TILE, dtype=torch.int64, device=device)


def tile_masks(bitmap: torch.Tensor) -> torch.Tensor:
    """``[..., ntiles]`` int64 bitmap -> ``[..., ntiles, 64]`` bool keep mask."""
    return ((bitmap.unsqueeze(-1) >> _bit_positions(bitmap.device)) & 1).bool()


def encode_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bitmap words and offsets of a keep mask whose rows are whole tiles.

    Args:
        mask: ``[*lead, n]`` bool, ``n`` a multiple of :data:`TILE`.

    Returns:
        ``(bitmap [*lead, n / 64] int64, offsets [*lead, n / 64] int32)``; offsets count from the row start.
    """
    *lead, n = mask.shape
    bits = mask.reshape(*lead, n // TILE, TILE)
    # Distinct powers of two: the sum is the bitwise OR (bit 63 wraps to the sign bit, which is what we want).
    bitmap = (bits.to(torch.int64) << _bit_positions(mask.device)).sum(-1)
    per_tile = bits.sum(-1, dtype=torch.int32)
    offsets = (torch.cumsum(per_tile, -1, dtype=torch.int32) - per_tile).to(torch.int32)
    return bitmap, offsets


def pack_bitmap(x: torch.Tensor, mask: torch.Tensor | None = None) -> BitmapTensor:
    """Compress the rows (last dimension) of ``x`` keeping the entries where ``mask`` is set.

    Rows of any length are allowed (the last tile is padded with clear bits); rows with different kept counts are
    padded with zeros in ``values`` to the longest row.

    Args:
        x: ``[*lead, n]`` values.
        mask: ``[*lead, n]`` bool keep mask (default ``x != 0``).

    Returns:
        A :class:`BitmapTensor` with ``unpack_bitmap(pack_bitmap(x, m)) == x * m``.
    """
    if mask is None:
        mask = x != 0
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    *lead, n = x.shape
    pad = -n % TILE
    bitmap, offsets = encode_mask(F.pad(mask, (0, pad)) if pad else mask)
    counts = mask.sum(-1)  # [*lead]
    nvals = int(counts.max()) if counts.numel() else 0
    if counts.numel() and bool((counts == nvals).all()):
        values = x[mask].reshape(*lead, nvals)
    else:
        values = x.new_zeros(*lead, nvals)
        valid = torch.arange(nvals, device=x.device) < counts.unsqueeze(-1)
        values[valid] = x[mask]
    return BitmapTensor(bitmap, offsets, values, n)


def pack_topk(x: torch.Tensor, keep: int) -> BitmapTensor:
    """Prune every ``d`` vector of ``x`` to its ``keep`` largest magnitudes and compress, without a host sync.

    Every vector keeps exactly ``keep`` entries, so the value count is known in advance (no padding, no
    ``.item()``), which keeps the KV cache's per-step append free of GPU -> CPU round trips.

    Args:
        x: ``[*lead, T, d]``, ``T * d`` a multiple of :data:`TILE`.
        keep: entries kept per vector, ``1 <= keep <= d``.

    Returns:
        A :class:`BitmapTensor` of rows ``[*lead, T * d]`` (token-major) with ``T * keep`` values per row.
    """
    *lead, T, d = x.shape
    if keep == d:
        idx = torch.arange(d, device=x.device).expand(*lead, T, d)
    else:
        idx = x.abs().topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    values = x.gather(-1, idx).reshape(*lead, T * keep)  # element order within each token
    mask = torch.zeros(*lead, T, d, dtype=torch.bool, device=x.device).scatter_(-1, idx, True)
    bitmap, offsets = encode_mask(mask.reshape(*lead, T * d))
    return BitmapTensor(bitmap, offsets, values, T * d)


def unpack_by_offsets(bitmap: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, length: int) -> torch.Tensor:
    """Dense ``[*lead, length]`` from bitmap words, *offsets* and values, addressed exactly as the decode kernel does.

    Element ``64 t + i``, if kept, is ``values[..., offsets[t] + popcount(bitmap[t] & (2^i - 1))]``: the values
    need not be the row's own (a row may index a buffer shared by several heads, e.g. an expanded
    ``[B, H, n]`` view with stride 0 over ``H``, as the KV cache uses for per-head keep counts).
    """
    *lead, ntiles = bitmap.shape
    keep = tile_masks(bitmap)  # [*lead, ntiles, 64]
    rank = torch.cumsum(keep, -1) - keep.to(torch.int64)
    idx = (offsets.to(torch.int64).unsqueeze(-1) + rank).where(keep, 0).reshape(*lead, ntiles * TILE)
    if values.shape[-1] == 0:
        return values.new_zeros(*lead, length)
    out = values.gather(-1, idx.clamp_max(values.shape[-1] - 1))
    out = out.masked_fill(~keep.reshape(*lead, ntiles * TILE), 0)
    return out[..., :length]


def token_offsets(bitmap: torch.Tensor, keep: int, head_dim: int) -> torch.Tensor:
    """Format-2 offsets: index in ``values`` of each tile's first kept value when every token keeps ``keep``.

    Token ``n`` (tiles ``n * head_dim / 64 ..``) starts at ``n * keep``, and each tile after the token's first adds
    the popcounts of the earlier tiles of the same token (``head_dim`` a multiple of 64; for ``head_dim`` < 64 a
    tile holds ``64 / head_dim`` whole tokens and starts at ``first token * keep``).

    Args:
        bitmap: ``[*lead, ntiles]`` int64.
        keep: kept entries per token vector.
        head_dim: ``d``.

    Returns:
        ``[*lead, ntiles]`` int32, what a version-1 row would store (:func:`unpack_by_offsets` reads it).
    """
    ntiles = bitmap.shape[-1]
    t = torch.arange(ntiles, device=bitmap.device)
    if head_dim < TILE:
        return (t * (TILE // head_dim) * keep).to(torch.int32).expand(bitmap.shape).contiguous()
    tpt = head_dim // TILE
    cnt = tile_masks(bitmap).sum(-1)  # [*lead, ntiles]
    per_token = cnt.reshape(*bitmap.shape[:-1], ntiles // tpt, tpt)
    within = (torch.cumsum(per_token, -1) - per_token).reshape(bitmap.shape)
    return ((t // tpt) * keep + within).to(torch.int32)


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
