"""Micro-batches of recorded calibration batches, and which one each optimizer step uses.

A recorded batch holds ``b`` sequences; recovery steps use ``batch_size`` of them at a time. Slicing takes rows
``[i, i + batch_size)`` of every tensor argument that has the batch's rows as its first dimension and at least
two dimensions (hidden states ``[b, s, h]``, position ids ``[b, s]``, masks ``[b, 1, s, s]``, rotary tables
``[b, s, d]``); tensors broadcast over the batch (first dimension 1) and 1-d tensors (``cache_position``) are
shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def slice_rows(obj, rows: int, lo: int, hi: int):
    """``obj`` (a tensor, tuple, list or dict of them) with rows ``[lo, hi)`` of its per-sequence tensors."""
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi] if obj.dim() >= 2 and obj.shape[0] == rows and (lo, hi) != (0, rows) else obj
    if isinstance(obj, tuple):
        return tuple(slice_rows(o, rows, lo, hi) for o in obj)
    if isinstance(obj, list):
        return [slice_rows(o, rows, lo, hi) for o in obj]
    if isinstance(obj, dict):
        return {k: slice_rows(v, rows, lo, hi) for k, v in obj.items()}
    return obj


def n_chunks(rows: int, batch_size: int) -> int:
    """Micro-batches of a batch of ``rows`` sequences."""
    return max(1, math.ceil(rows / batch_size))


@dataclass(frozen=True)
class Schedule:
    """Which calibration batch, and which chunk of it, optimizer step ``t`` uses; shared by all processes.

    Step ``t`` uses global batch ``g = t mod n_batches`` and its chunk ``(t // n_batches) mod chunks(g)``. Only
    the process that holds batch ``g`` computes a gradient; the others contribute zeros to the all-reduce, so a
    multi-process run takes the same steps as one process.

    Attributes:
        batch_ids: the global indices of this process's batches, in its local order.
        n_batches: calibration batches over all processes.
    """

    batch_ids: Sequence[int]
    n_batches: int

    @classmethod
    def local(cls, n: int) -> Schedule:
        """One process holding all ``n`` batches."""
        return cls(tuple(range(n)), n)

    def at(self, t: int, rows: Sequence[int], batch_size: int) -> tuple[int, int, int] | None:
        """``(local batch, first row, end row)`` of step ``t`` on this process, or None when another holds it.

        Args:
            rows: sequences of each local batch.
        """
        g = t % self.n_batches
        if g not in self.batch_ids:
            return None
        j = list(self.batch_ids).index(g)
        c = (t // self.n_batches) % n_chunks(rows[j], batch_size)
        return j, c * batch_size, min((c + 1) * batch_size, rows[j])
