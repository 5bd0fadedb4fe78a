"""Dense mirror of a bitmap KV layer for the torch attention path (a working buffer, not the cache)."""

from __future__ import annotations

import torch


class DenseMirror:
    """``[B, H, capacity, d]`` K and V buffers whose first ``T`` token slots are what the torch path attends over.

    :class:`~llmprune.runtime.kvcache.layer.BitmapKVLayer` writes each step's new tokens at the end and, at each
    flush, overwrites the just-compressed tokens' slots with their pruned reconstruction; a step then returns
    views of the first ``T`` slots, so it never decompresses the whole store. Capacity grows by doubling
    (amortised O(new tokens) per write). Its memory is that of a dense cache: it is reported by :meth:`nbytes`,
    never as the cache's bytes.

    Args:
        head_dim: ``d``.
        dtype, device: of the buffers.
        capacity: token slots to allocate at the first write (at least).
    """

    def __init__(self, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        self.head_dim, self.dtype, self.device, self.capacity = head_dim, dtype, device, capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k`` / ``v [B, H, n, d]`` (detached) at token slots ``[start, start + n)``."""
        end = start + k.shape[-2]
        cap = 0 if self.k is None else self.k.shape[-2]
        if end > cap:
            new_cap = max(end, 2 * cap, self.capacity, 64)
            grown = []
            for old in (self.k, self.v):
                buf = torch.empty(*k.shape[:2], new_cap, self.head_dim, dtype=self.dtype, device=self.device)
                if old is not None:
                    buf[:, :, :cap] = old
                grown.append(buf)
            self.k, self.v = grown
        self.k[:, :, start:end] = k.detach()
        self.v[:, :, start:end] = v.detach()

    def view(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` views ``[B, H, tokens, d]``; valid until the next write (flushes rewrite in place)."""
        return self.k[:, :, :tokens], self.v[:, :, :tokens]

    def index_batch(self, idx: torch.Tensor, tokens: int) -> None:
        """Keep (and reorder) batch rows ``idx``; only the first ``tokens`` slots are copied."""
        if self.k is not None:
            self.k = self.k[:, :, :tokens].index_select(0, idx)
            self.v = self.v[:, :, :tokens].index_select(0, idx)

    def nbytes(self) -> int:
        """Bytes allocated (both buffers, spare capacity included)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()
