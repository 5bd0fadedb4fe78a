"""Argument checks of the bitmap-KV decode launcher (:func:`llmprune.kernels.kv_bitmap_attention.kv_bitmap_attention`):
row shapes, the format-2 keep count, whether 16-bit values can be read as 4-byte pairs."""

from __future__ import annotations

import torch


def check_row(name: str, t: torch.Tensor, B: int, H: int, dtype, min_len: int, device) -> None:
    """Raise ``ValueError`` unless ``t`` is ``[B, H, >= min_len]`` in ``dtype`` on ``device``, last dim contiguous."""
    if t.dim() != 3 or t.shape[0] != B or t.shape[1] != H or t.shape[2] < min_len:
        raise ValueError(f"{name} must be [{B}, {H}, >={min_len}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if t.shape[2] > 1 and t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def pairs(values: torch.Tensor, keep: int) -> bool:
    """Whether a format-2 row's 16-bit values can be read as 4-byte pairs (every row starts 4-byte aligned)."""
    return (keep > 0 and values.element_size() == 2 and values.data_ptr() % 4 == 0
            and all(st % 2 == 0 for st in values.stride()[:2]))


def row_keep(which: str, offsets, values: torch.Tensor, keep: int | None, n_compressed: int, d: int) -> int:
    """The per-token keep count of a format-2 row (0: version 1, read through ``offsets``)."""
    if offsets is not None:
        if keep is not None:
            raise ValueError(f"{which}_keep is for format-2 rows (no offsets); {which}_offsets were given")
        return 0
    if values.shape[1] > 1 and values.stride(1) == 0:
        raise ValueError(f"{which}_values is one buffer shared by the heads: that layout needs {which}_offsets "
                         "(format version 1)")
    if n_compressed == 0:
        return keep or 1
    if keep is None:
        if values.shape[2] % n_compressed:
            raise ValueError(f"format-2 {which}_values must hold n_compressed * keep = {n_compressed} * k values, "
                             f"got {values.shape[2]} (pass {which}_keep, or {which}_offsets for version 1)")
        keep = values.shape[2] // n_compressed
    if not 1 <= keep <= d or values.shape[2] < n_compressed * keep:
        raise ValueError(f"{which}_keep = {keep}: need 1 <= keep <= {d} and {which}_values of at least "
                         f"{n_compressed} * keep entries, got {values.shape[2]}")
    if n_compressed * keep >= 2**31:
        raise ValueError(f"{which}: {n_compressed} tokens x {keep} values per row exceed the kernel's int32 indices")
    return keep
