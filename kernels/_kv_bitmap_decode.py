"""Block decoders of the bitmap-KV decode kernel (``@triton.jit`` helpers, inlined): bitmap words + values -> dense.

Layout: :mod:`llmprune.formats.bitmap`. :func:`decode_block` picks the format-2 decoder (every token keeps exactly
``KEEP`` values, offsets derived: one contiguous, 16-byte-vectorized value run per block, expanded from a register
tile) or the version-1 decoder (stored per-tile offsets, one global gather per value).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _popcount32(x, HW_POPC: tl.constexpr):
    """Set bits of each int32 ``x``: the ``POPC`` instruction on the GPU, SWAR bit arithmetic elsewhere."""
    if HW_POPC:
        return libdevice.popc(x)
    x = x - ((x >> 1) & 0x55555555)  # arithmetic shifts are safe: the masks clear the sign-filled bits
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x + (x >> 8) + (x >> 16) + (x >> 24)) & 0x3F


@triton.jit
def _halves(bm_ptr, offs_n, n_ok, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """``[BLOCK_N, D / 32]`` int32: the bitmap of tokens ``offs_n`` as 32-bit halves, in element order."""
    TPT: tl.constexpr = D // 64
    tiles = offs_n[:, None] * TPT + tl.arange(0, TPT)[None, :]  # [BLOCK_N, TPT]: one token's words are adjacent
    if MASKED:
        words = tl.load(bm_ptr + tiles, mask=n_ok[:, None], other=0)
    else:
        words = tl.load(bm_ptr + tiles)
    return tl.reshape(tl.join(words.to(tl.int32), (words >> 32).to(tl.int32)), (BLOCK_N, 2 * TPT))


@triton.jit
def _expand(halves, first, src, BLOCK_N: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
            HW_POPC: tl.constexpr):
    """Dense ``[BLOCK_N, D]`` from the bitmap halves and the packed values ``src [CHUNK]`` (a register tile whose
    last entry is zero).

    ``first [BLOCK_N, D / 32]``: index in ``src`` of each half's first kept value. Element ``i`` of a half is kept
    when bit ``i`` is set; shifting the half left by ``31 - i`` puts that bit in the sign and leaves the bits below
    it, so ``popcount - 1`` is its rank: no prefix sum across lanes. Dropped elements read the zero entry.
    """
    # Broadcast each half over its 32 elements with joins, which keep the new axes inside one thread: a thread
    # then decodes 32 consecutive elements of one half (the half's words, popcounts and start are per thread,
    # not per element) and the dense block is stored for the tensor cores as 16-byte vectors.
    x = tl.join(halves, halves)
    x = tl.join(x, x)
    x = tl.join(x, x)
    x = tl.join(x, x)
    x = tl.reshape(tl.join(x, x), (BLOCK_N, D // 32, 32))
    f = tl.join(first, first)
    f = tl.join(f, f)
    f = tl.join(f, f)
    f = tl.join(f, f)
    f = tl.reshape(tl.join(f, f), (BLOCK_N, D // 32, 32))
    sh = x << (31 - tl.arange(0, 32))[None, None, :]  # [BLOCK_N, D / 32, 32]
    idx = tl.where(sh < 0, f + _popcount32(sh, HW_POPC) - 1, CHUNK - 1)
    return tl.reshape(tl.gather(src, tl.reshape(idx, (BLOCK_N * D,)), 0), (BLOCK_N, D))


@triton.jit
def _decode_derived(bm_ptr, val_ptr, n0, n_end, KEEP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HW_POPC: tl.constexpr):
    """Dense block of tokens ``n0 ..`` of a row whose every token keeps exactly ``KEEP`` values (format v2).

    The block's values are one contiguous run ``values[n0 * KEEP : (n0 + BLOCK_N) * KEEP]``, read as 16-byte
    vectors (``CHUNK`` = next power of two); token ``t``'s half ``h`` starts at ``t * KEEP + popcount`` of the
    token's earlier halves (a per-thread scan over ``D / 32`` words), so no offsets are stored or loaded.
    """
    tok = tl.arange(0, BLOCK_N)
    halves = _halves(bm_ptr, n0 + tok, n0 + tok < n_end, D, BLOCK_N, MASKED)
    cnt = _popcount32(halves, HW_POPC)
    first = tok[:, None] * KEEP + tl.cumsum(cnt, 1) - cnt
    c = tl.arange(0, CHUNK)
    if MASKED:
        src = tl.load(val_ptr + n0 * KEEP + c, mask=c < (n_end - n0) * KEEP, other=0.0)
    else:
        src = tl.load(val_ptr + n0 * KEEP + c, mask=c < BLOCK_N * KEEP, other=0.0)
    return _expand(halves, first, src, BLOCK_N, D, CHUNK, HW_POPC)


@triton.jit
def _decode_by_offsets(bm_ptr, off_ptr, val_ptr, offs_n, n_ok, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       HW_POPC: tl.constexpr):
    """Dense block of tokens ``offs_n`` through the stored per-tile offsets (format v1, any keep counts).

    Each value is gathered from global memory at ``offsets[tile] + rank`` (2-byte loads): the general path, for
    rows whose values are not one contiguous run per block (per-head keep counts sharing one buffer).
    """
    TPT: tl.constexpr = D // 64
    tiles = offs_n[:, None] * TPT + tl.arange(0, TPT)[None, :]  # [BLOCK_N, TPT]
    words = tl.load(bm_ptr + tiles, mask=n_ok[:, None], other=0)
    starts = tl.load(off_ptr + tiles, mask=n_ok[:, None], other=0)
    lo = words.to(tl.int32)
    hi = (words >> 32).to(tl.int32)
    halves = tl.join(lo, hi)  # [BLOCK_N, TPT, 2]
    first = tl.join(starts, starts + _popcount32(lo, HW_POPC))  # index of each half's first kept value
    sh = halves[:, :, :, None] << (31 - tl.arange(0, 32))[None, None, None, :]
    kept = sh < 0
    idx = first[:, :, :, None] + _popcount32(sh, HW_POPC) - 1
    vals = tl.load(val_ptr + tl.where(kept, idx, 0), mask=kept & n_ok[:, None, None, None], other=0.0)
    return tl.reshape(vals, (BLOCK_N, D))


@triton.jit
def decode_block(bm_ptr, off_ptr, val_ptr, n0, n_end, KEEP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HW_POPC: tl.constexpr):
    """Dense ``[BLOCK_N, D]`` block of tokens ``n0 ..`` (zeros where pruned and past ``n_end``).

    ``KEEP > 0``: format 2 (``off_ptr`` unused; ``MASKED`` False only for whole blocks, whose loads then carry
    no token mask). ``KEEP == 0``: version 1 through ``off_ptr``.
    """
    if KEEP > 0:
        x = _decode_derived(bm_ptr, val_ptr, n0, n_end, KEEP, CHUNK, D, BLOCK_N, MASKED, HW_POPC)
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        x = _decode_by_offsets(bm_ptr, off_ptr, val_ptr, offs_n, offs_n < n_end, D, BLOCK_N, HW_POPC)
    return x
