"""The packed 2:4 byte layout (format version 1): :func:`pack_24` / :func:`unpack_24`.

For a 2:4-sparse linear weight ``W`` of shape ``[out, in]`` (``in`` a multiple of 4):

* Columns are cut into groups of 4 (``in / 4`` groups per row). Each group keeps at most 2 non-zeros.
* ``values``: ``[out, in / 2]`` in the weight's dtype. Kept value ``j`` of a row belongs to group ``j // 2``
  (slot ``j % 2``); the two values of a group are stored in increasing column order. A group with fewer than
  two non-zeros stores explicit zeros (its free slots take the lowest unused positions).
* ``meta``: ``[out, ceil(in / 32)]`` ``int32``. Kept value ``j`` has a 2-bit position ``p`` (0..3) inside its
  group, stored at bits ``2 * (j % 16)`` .. ``2 * (j % 16) + 1`` of word ``meta[row, j // 16]`` (least
  significant bits first; one word = 16 kept values = 8 groups = 32 input columns; unused high bits of the
  last word are 0). The input column of value ``j`` is ``4 * (j // 2) + p``. Words are stored as signed
  ``int32`` (bit 31 is the sign bit; read them as unsigned).

So ``W[r, 4 * (j // 2) + p(r, j)] = values[r, j]`` and every other entry is 0. Bytes per weight: half a
value plus 1/16 byte of metadata: 56.25% of dense for 16-bit dtypes.

This module is the bottom of the stack: the Triton kernel (:mod:`llmprune.kernels.sparse24_linear`), the
``Sparse24Linear`` module and the ``"packed"`` checkpoint format (:mod:`llmprune.runtime.sparse24`) all read
this layout through it; :func:`validate_packed` checks a stored packing before it is used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: ``quant_method`` written to ``config.json`` by packed checkpoints (and registered with transformers).
QUANT_METHOD = "llmprune_sparse24"
#: Version of the layout above; readers refuse newer versions.
FORMAT_VERSION = 1
#: Sparsity patterns whose masks always fit the layout (at most 2 non-zeros per aligned group of 4).
PACKABLE_PATTERNS = ("2:4", "1:4", "1:2")


def meta_words(in_features: int) -> int:
    """Number of ``int32`` metadata words per row for ``in_features`` input columns."""
    return (in_features // 2 + 15) // 16


def is_24(weight: torch.Tensor) -> bool:
    """True iff ``weight`` (``[out, in]``) has at most 2 non-zeros in every aligned group of 4 columns."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


@functools.cache
def _group_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables indexed by a group's 4-bit occupancy mask.

    Returns:
        ``(positions [16, 2] int64, ok [16] bool)``: the two stored positions of each mask (its non-zeros,
        then the lowest free positions, increasing) and whether the mask has at most two bits set.
    """
    pos = torch.zeros(16, 2, dtype=torch.int64)
    ok = torch.zeros(16, dtype=torch.bool)
    for mask in range(16):
        nz = [p for p in range(4) if mask >> p & 1]
        ok[mask] = len(nz) <= 2
        chosen = sorted((nz + [p for p in range(4) if p not in nz])[:2]) if len(nz) <= 2 else [0, 1]
        pos[mask] = torch.tensor(chosen)
    return pos.to(device), ok.to(device)


def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4-sparse weight into the layout of the module docstring.

    Args:
        weight: ``[out, in]``, ``in`` a multiple of 4, at most 2 non-zeros per aligned group of 4 columns.

    Returns:
        ``(values [out, in / 2] in weight.dtype, meta [out, ceil(in / 32)] int32)``;
        ``unpack_24(*pack_24(w))`` equals ``w`` exactly.

    Raises:
        ValueError: if ``weight`` is not 2-D, ``in`` is not a multiple of 4, or a group of 4 holds more
            than 2 non-zeros (the message names the first offending row and group).
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_24 expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"pack_24: input dim {cols} is not a multiple of 4; the weight cannot be 2:4")
    groups = weight.reshape(rows, cols // 4, 4)
    bits = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=weight.device)
    occupancy = ((groups != 0).to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)  # [rows, G], 4-bit mask
    lut_pos, lut_ok = _group_tables(weight.device)
    bad = ~lut_ok[occupancy.long()]
    if bool(bad.any()):
        r, g = bad.nonzero()[0].tolist()
        n = int((groups[r, g] != 0).sum())
        raise ValueError(
            f"weight is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold {n} non-zeros "
            f"({int(bad.sum())} of {bad.numel()} groups exceed 2); prune it with sparsity 2:4 first"
        )
    idx = lut_pos[occupancy.long()]  # [rows, G, 2] positions, increasing
    values = groups.gather(-1, idx).reshape(rows, cols // 2).contiguous()
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int64)  # group g -> bits 4*(g%8) of word g//8
    nwords = meta_words(cols)
    pad = nwords * 8 - cols // 4
    if pad:
        nibbles = F.pad(nibbles, (0, pad))
    shifts = torch.arange(0, 32, 4, device=weight.device, dtype=torch.int64)
    # The shifted nibbles occupy disjoint bits, so their sum is their OR; it is < 2**32, exact in int64.
    words = (nibbles.reshape(rows, nwords, 8) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return values, words.contiguous()


def validate_packed(values: torch.Tensor, meta: torch.Tensor, in_features: int, *, rows_per_chunk: int = 4096) -> None:
    """Check that ``values`` / ``meta`` are a well-formed packing (the layout above) of an ``[out, in_features]``
    weight, before anything runs on them.

    Checked: ``values`` is a floating ``[out, in/2]`` tensor, ``meta`` an ``int32`` ``[out, ceil(in/32)]`` one,
    ``in_features`` a positive multiple of 4; the two 2-bit positions of every group are strictly increasing
    (a duplicate position would make both values land on one column, losing one; :func:`pack_24` never writes
    one); the unused high bits of each row's last word are 0. Vectorised over ``rows_per_chunk`` rows at a
    time (a few bytes of scratch per stored value).

    Raises:
        ValueError: naming what is wrong (for positions: the first bad row and group).
    """
    if type(in_features) is not int or in_features <= 0 or in_features % 4:
        raise ValueError(f"in_features {in_features!r} is not a positive multiple of 4")
    half, words = in_features // 2, meta_words(in_features)
    if not values.is_floating_point() or values.dim() != 2 or values.shape[1] != half:
        raise ValueError(
            f"values must be a floating [out, {half}] tensor, got {values.dtype} {tuple(values.shape)}"
        )
    rows = values.shape[0]
    if meta.dtype != torch.int32 or tuple(meta.shape) != (rows, words):
        raise ValueError(f"meta must be int32 [{rows}, {words}], got {meta.dtype} {tuple(meta.shape)}")
    shifts = torch.arange(0, 32, 2, device=meta.device, dtype=torch.int32)
    for r0 in range(0, rows, rows_per_chunk):
        m = meta[r0:r0 + rows_per_chunk]
        codes = ((m.unsqueeze(-1) >> shifts) & 3).to(torch.uint8).reshape(m.shape[0], words * 16)
        if half < words * 16 and bool((codes[:, half:] != 0).any()):
            r = int((codes[:, half:] != 0).any(-1).nonzero()[0])
            raise ValueError(f"row {r0 + r}: unused high bits of the last meta word are not 0")
        pairs = codes[:, :half].reshape(m.shape[0], half // 2, 2)
        bad = pairs[..., 0] >= pairs[..., 1]
        if bool(bad.any()):
            r, g = bad.nonzero()[0].tolist()
            p0, p1 = pairs[r, g].tolist()
            raise ValueError(
                f"row {r0 + r}, group {g} (columns {4 * g}..{4 * g + 3}): positions {p0}, {p1} are not strictly "
                f"increasing ({int(bad.sum())} bad group{'s' if int(bad.sum()) != 1 else ''} in rows {r0}..{r0 + m.shape[0] - 1}); the metadata is corrupt"
            )


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_24`.

    Args:
        values: ``[out, in / 2]`` kept values.
        meta: ``[out, ceil(in / 32)]`` int32 position words.

    Returns:
        The dense ``[out, in]`` weight in ``values.dtype`` (zeros included).

    Raises:
        ValueError: if the shapes or the meta dtype do not match the layout.
    """
    if values.dim() != 2 or meta.dim() != 2 or values.shape[0] != meta.shape[0]:
        raise ValueError(f"unpack_24: bad shapes values {tuple(values.shape)}, meta {tuple(meta.shape)}")
    rows, half = values.shape
    if half % 2 or meta.shape[1] != (half + 15) // 16 or meta.dtype != torch.int32:
        raise ValueError(
            f"unpack_24: values {tuple(values.shape)} / meta {tuple(meta.shape)} {meta.dtype} do not match the "
            "packed 2:4 layout (meta must be int32 [out, ceil(in/32)])"
        )
    shifts = torch.arange(0, 32, 2, device=meta.device, dtype=torch.int32)
    codes = ((meta.unsqueeze(-1) >> shifts) & 3).reshape(rows, -1)[:, :half].to(torch.int64)
    cols = 2 * half
    col = 4 * (torch.arange(half, device=values.device) // 2) + codes
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense.scatter_(1, col, values)
    return dense
