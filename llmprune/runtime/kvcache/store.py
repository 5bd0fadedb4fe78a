"""Growing bitmap storage of one of K / V in one attention layer (layout: :mod:`llmprune.formats.bitmap`).

Rows with one keep count for every head are format version 2 (bitmap + values, offsets derived, not stored);
per-head keep counts are version 1 (stored offsets into one values buffer shared by the heads).
"""

from __future__ import annotations

import torch

from llmprune.formats.bitmap import (
    TILE,
    TILE_META_BYTES,
    TILE_WORD_BYTES,
    BitmapTensor,
    pack_topk,
    token_offsets,
    unpack_bitmap,
    unpack_by_offsets,
)


def _round_up(n: int, to: int = 64) -> int:
    """Buffer lengths in multiples of 64 elements: every row of a ``[B, H, n]`` buffer then starts 128-byte aligned,
    so the decode kernel reads 16-bit values as 4-byte pairs in 16-byte vectors whatever the keep count."""
    return -(-n // to) * to


class _BitmapStore:
    """Bitmap storage of ``[B, H, T, d]`` pruned to ``keep`` entries per token; a row is one ``(b, h)``.

    Buffers are preallocated for ``capacity`` tokens and grow by doubling, so an append writes in place and the
    kernel reads ``bitmap`` / ``values`` (and, for version 1, ``offsets``) views without copies.

    One keep count for all heads (format version 2): every token of a row keeps exactly ``keep`` values, stored
    contiguously, so no offsets are stored (:attr:`offsets` is None; :attr:`kernel_keep` is the count the decode
    kernel derives them from).

    Per-head keep counts (``keep`` a sequence of ``H`` counts that are not all equal; format version 1): the kept
    values of all
    heads of a batch row share one buffer ``[B, n_vals]`` (each appended chunk holds head 0's values, then head
    1's, ...) and every head's offsets index that shared buffer directly. :attr:`values` is then the
    ``[B, H, n_vals]`` view of it with stride 0 over ``H``, so the decode kernel, which reads
    ``values[b, h, offsets[b, h, t] + rank]``, takes it unchanged, and no head is padded: the buffer holds
    exactly the kept values.

    Args:
        batch: ``B``.
        heads: KV heads ``H``.
        head_dim: ``d``.
        keep: entries kept per token vector (:func:`~llmprune.formats.bitmap.keep_count`), one for every head or
            a sequence of ``H`` per-head counts.
        dtype: value dtype.
        device: storage device.
        capacity: tokens to preallocate.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, keep, dtype, device, capacity: int = 0):
        keeps = [int(k) for k in keep] if isinstance(keep, (list, tuple)) else [int(keep)] * heads
        if len(keeps) != heads:
            raise ValueError(f"{len(keeps)} keep counts for {heads} KV heads")
        self.mixed = len(set(keeps)) > 1
        self.keeps = keeps
        self.B, self.H, self.d = batch, heads, head_dim
        self.keep = keeps if self.mixed else keeps[0]
        self.tokens = 0
        self.n_tiles = 0
        self.n_vals = 0  # per row (uniform) or per batch row, all heads together (mixed)
        tiles_cap = capacity * head_dim // TILE
        self._bitmap = torch.zeros(batch, heads, tiles_cap, dtype=torch.int64, device=device)
        # Version 1 only: stored per-tile offsets into the shared values buffer.
        self._offsets = torch.zeros(batch, heads, tiles_cap, dtype=torch.int32, device=device) if self.mixed else None
        if self.mixed:
            self._values = torch.zeros(batch, _round_up(capacity * sum(keeps)), dtype=dtype, device=device)
        else:
            self._values = torch.zeros(batch, heads, _round_up(capacity * keeps[0]), dtype=dtype, device=device)

    @staticmethod
    def _grow(buf: torch.Tensor, need: int) -> torch.Tensor:
        cap = buf.shape[-1]
        if need <= cap:
            return buf
        new = buf.new_zeros(*buf.shape[:-1], _round_up(max(need, 2 * cap, 64)))
        new[..., :cap] = buf
        return new

    def append(self, x: torch.Tensor, piece: int = 4096) -> None:
        """Prune ``x [B, H, T, d]`` (``T * d`` a multiple of 64) and append it.

        Appends ``piece`` tokens at a time, which bounds the top-k / mask temporaries of a long prefill.
        """
        for s in range(0, x.shape[2], piece):
            self._append(x[:, :, s : s + piece])

    def _append(self, x: torch.Tensor) -> None:
        if self.mixed:
            return self._append_mixed(x)
        bt = pack_topk(x, self.keep)
        nt, nv = bt.bitmap.shape[-1], bt.values.shape[-1]
        self._bitmap = self._grow(self._bitmap, self.n_tiles + nt)
        self._values = self._grow(self._values, self.n_vals + nv)
        self._bitmap[..., self.n_tiles : self.n_tiles + nt] = bt.bitmap
        self._values[..., self.n_vals : self.n_vals + nv] = bt.values
        self.tokens += x.shape[2]
        self.n_tiles += nt
        self.n_vals += nv

    def _append_mixed(self, x: torch.Tensor) -> None:
        T = x.shape[2]
        nt = T * self.d // TILE
        self._bitmap = self._grow(self._bitmap, self.n_tiles + nt)
        self._offsets = self._grow(self._offsets, self.n_tiles + nt)
        self._values = self._grow(self._values, self.n_vals + T * sum(self.keeps))
        base = self.n_vals
        for h, k in enumerate(self.keeps):
            bt = pack_topk(x[:, h], k)  # rows [B, T * d], T * k values each
            self._bitmap[:, h, self.n_tiles : self.n_tiles + nt] = bt.bitmap
            self._offsets[:, h, self.n_tiles : self.n_tiles + nt] = bt.offsets + base
            self._values[:, base : base + T * k] = bt.values
            base += T * k
        self.tokens += T
        self.n_tiles += nt
        self.n_vals = base

    @property
    def bitmap(self) -> torch.Tensor:
        """``[B, H, tokens * d / 64]`` int64."""
        return self._bitmap[..., : self.n_tiles]

    @property
    def version(self) -> int:
        """Bitmap format version of the rows: 2 (offsets derived) with one keep count, 1 (stored) with per-head."""
        return 1 if self.mixed else 2

    @property
    def offsets(self) -> torch.Tensor | None:
        """``[B, H, tokens * d / 64]`` int32 stored offsets (version 1), None for version 2 (derived)."""
        return self._offsets[..., : self.n_tiles] if self.mixed else None

    @property
    def kernel_keep(self) -> int | None:
        """The per-token keep count the decode kernel derives the offsets from (version 2), else None."""
        return None if self.mixed else self.keep

    @property
    def values(self) -> torch.Tensor:
        """``[B, H, tokens * keep]`` kept values; with per-head keep counts the ``[B, H, n_vals]`` stride-0 view
        of the shared per-batch-row buffer (read through the offsets)."""
        if self.mixed:
            return self._values[:, None, : self.n_vals].expand(self.B, self.H, self.n_vals)
        return self._values[..., : self.n_vals]

    def as_bitmap_tensor(self) -> BitmapTensor:
        """The rows as a :class:`BitmapTensor` (version-2 offsets are derived here, a copy)."""
        offsets = self.offsets if self.mixed else token_offsets(self.bitmap, self.keep, self.d)
        return BitmapTensor(self.bitmap, offsets, self.values, self.tokens * self.d)

    def dense(self) -> torch.Tensor:
        """``[B, H, tokens, d]`` reconstruction (pruned entries zero)."""
        if self.tokens == 0:
            return self._values.new_zeros(self.B, self.H, 0, self.d)
        if self.mixed:  # values addressed through the offsets, exactly as the kernel reads them
            out = unpack_by_offsets(self.bitmap, self.offsets, self.values, self.tokens * self.d)
            return out.view(self.B, self.H, self.tokens, self.d)
        return unpack_bitmap(self.as_bitmap_tensor()).view(self.B, self.H, self.tokens, self.d)

    def nbytes(self, element_size: int) -> int:
        """Bytes of the stored tokens (not the spare capacity), values at ``element_size`` bytes."""
        if self.mixed:  # version 1; n_vals counts every head's kept values of a batch row
            return self.B * (self.H * self.n_tiles * TILE_META_BYTES + self.n_vals * element_size)
        return self.B * self.H * (self.n_tiles * TILE_WORD_BYTES + self.n_vals * element_size)

    def index_batch(self, idx: torch.Tensor) -> None:
        """Keep (and reorder) the batch rows ``idx`` (beam search, batch selection)."""
        self._bitmap = self._bitmap.index_select(0, idx)
        if self._offsets is not None:
            self._offsets = self._offsets.index_select(0, idx)
        self._values = self._values.index_select(0, idx)
        self.B = self._values.shape[0]
