"""Block decoders of the bitmap-KV decode kernel (``@triton.jit`` helpers, inlined): bitmap words + values -> dense.

Layout: :mod:`llmprune.formats.bitmap`. :func:`decode_block` picks the format-2 decoder (every token keeps exactly
``KEEP`` values, offsets derived: one contiguous, 16-byte-vectorized value run per block, expanded from a register
tile, two 16-bit elements per 32-bit gather when ``PAIRS``) or the version-1 decoder (stored per-tile offsets, one
global gather per value). ``HW_POPC``: compiled for the GPU (``POPC``, ``PRMT``); the interpreter runs the same
operands through plain integer arithmetic.
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
def _per_half(t, BLOCK_N: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
    """``t [BLOCK_N, D / 32]`` repeated ``R`` (16 or 32) times along a new last axis: ``[BLOCK_N, D / 32, R]``.

    By joins, which keep the new axes inside one thread: a thread then decodes the ``R`` consecutive elements (or
    pairs) of one half, with the half's words, popcounts and start per thread, not per element, and the dense block
    is stored for the tensor cores as 16-byte vectors.
    """
    t = tl.join(t, t)
    t = tl.join(t, t)
    t = tl.join(t, t)
    t = tl.join(t, t)
    if R == 32:
        t = tl.join(t, t)
    return tl.reshape(t, (BLOCK_N, D // 32, R))


@triton.jit
def _expand(halves, first, src, BLOCK_N: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
            HW_POPC: tl.constexpr):
    """Dense ``[BLOCK_N, D]`` from the bitmap halves and the packed values ``src [CHUNK]`` (a register tile whose
    last entry is zero).

    ``first [BLOCK_N, D / 32]``: index in ``src`` of each half's first kept value. Element ``i`` of a half is kept
    when bit ``i`` is set; shifting the half left by ``31 - i`` puts that bit in the sign and leaves the bits below
    it, so ``popcount - 1`` is its rank: no prefix sum across lanes. Dropped elements read the zero entry.
    """
    x = _per_half(halves, BLOCK_N, D, 32)
    f = _per_half(first, BLOCK_N, D, 32)
    sh = x << (31 - tl.arange(0, 32))[None, None, :]  # [BLOCK_N, D / 32, 32]
    idx = tl.where(sh < 0, f + _popcount32(sh, HW_POPC) - 1, CHUNK - 1)
    return tl.reshape(tl.gather(src, tl.reshape(idx, (BLOCK_N * D,)), 0), (BLOCK_N, D))


@triton.jit
def _pair_mask(x, sh, p, HW: tl.constexpr):
    """int32 masks of element pairs ``(2p, 2p + 1)`` of the halves ``x``: ``0xFFFF`` in the low half where bit
    ``2p`` is set (the sign of ``sh = x << (31 - 2p)``), in the high half where bit ``2p + 1`` is.

    On the GPU one ``PRMT`` in sign-replicate mode per pair: bit ``2p + 1`` is the top bit of byte ``p // 4`` of
    ``x << (6 - 2 * (p % 4))``, so four shifts of a half serve its 16 pairs.
    """
    odd = x << (6 - 2 * (p % 4))
    sel = tl.broadcast_to(0xBB | ((0xC + p // 4) * 0x1100), sh.shape)
    if HW:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [sh, odd, sel], dtype=tl.int32,
                                         is_pure=True, pack=1)
    # PRMT emulated on the same operands: the high half copies the top bit of byte (selector nibble & 3) of odd
    hi = (odd >> (8 * ((sel >> 8) & 3) + 7)) & 1
    return (-hi & -65536) | ((sh >> 31) & 0xFFFF)  # the arithmetic shift spreads the sign of sh over the word


@triton.jit
def _opaque(x, DTYPE: tl.constexpr, HW: tl.constexpr):
    """int16 ``x`` reinterpreted as ``DTYPE``; on the GPU first through a non-pure ``mov`` (two elements per 32-bit
    register, no instruction left after ptxas). Triton sizes a dot operand's register layout (``kWidth``) from the
    chain of elementwise ops and joins behind it; through this chain's joins it would pick 4 (64-bit shared loads
    and register shuffles instead of ``ldmatrix``). An op with side effects, last before the dot, ends the chain
    (Triton 3.6 and 3.9 both keep ``kWidth`` 2)."""
    if HW:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int16, is_pure=False, pack=2)
    return x.to(DTYPE, bitcast=True)


@triton.jit
def _sliding_pairs(src32, CW: tl.constexpr):
    """``[2 * CW]`` int32 words ``w[j] = src[j - 1] | src[j] << 16`` (``w[0]``'s low half arbitrary) of the 16-bit
    values whose aligned pairs are ``src32 [CW]`` (``src32[m] = src[2m] | src[2m + 1] << 16``).

    Word ``j`` holds the two values that an element pair reads when ``j`` values precede or end at its first
    element, so one 32-bit gather serves two dense elements (:func:`_expand_pairs`).
    """
    prev = tl.gather(src32, tl.maximum(tl.arange(0, CW) - 1, 0), 0)
    # src[2m - 1] | src[2m] << 16; word 0's low half (src[0] here, not 0) is only read by a pair whose first element
    # is dropped, so the pair mask clears it
    even = ((prev >> 16) & 0xFFFF) | (src32 << 16)
    return tl.reshape(tl.join(even, src32), (2 * CW,))


@triton.jit
def _expand_pairs(halves, first, words, BLOCK_N: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
                  HW_POPC: tl.constexpr):
    """Dense ``[BLOCK_N, D]`` in ``DTYPE`` (16-bit) from the bitmap halves, each half's first value index
    ``first [BLOCK_N, D / 32]`` and the sliding pair words ``words`` (:func:`_sliding_pairs`), two elements per
    gather.

    For the pair ``(i, i + 1)`` of a half (``i`` even) let ``c`` be the values before element ``i``: if ``i`` is
    kept its value is ``src[c]`` and ``i + 1``'s (if kept) ``src[c + 1]``: word ``c + 1``; if ``i`` is dropped,
    ``i + 1``'s value is ``src[c]``: the high half of word ``c``. Both are word ``first + popcount(bits <= i)``,
    and the pair mask clears the dropped halves: shift, ``POPC``, address, one 32-bit shared-memory load,
    ``PRMT`` and ``AND`` per two elements (the single-element path needs about 7.5 per element).
    """
    x = _per_half(halves, BLOCK_N, D, 16)
    f = _per_half(first, BLOCK_N, D, 16)
    p = tl.arange(0, 16)[None, None, :]
    sh = x << (31 - 2 * p)  # sign: bit i = 2p; the bits below it are the ones before
    idx = tl.reshape(f + _popcount32(sh, HW_POPC), (BLOCK_N * D // 2,))
    w = tl.reshape(tl.gather(words, idx, 0), (BLOCK_N, D // 32, 16)) & _pair_mask(x, sh, p, HW_POPC)
    dense = tl.reshape(tl.join(w.to(tl.int16), (w >> 16).to(tl.int16)), (BLOCK_N, D))
    return _opaque(dense, DTYPE, HW_POPC)


@triton.jit
def _decode_derived(bm_ptr, val_ptr, n0, n_end, KEEP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HW_POPC: tl.constexpr, PAIRS: tl.constexpr):
    """Dense block of tokens ``n0 ..`` of a row whose every token keeps exactly ``KEEP`` values (format v2).

    The block's values are one contiguous run ``values[n0 * KEEP : (n0 + BLOCK_N) * KEEP]``, read as 16-byte
    vectors (``CHUNK`` = next power of two); token ``t``'s half ``h`` starts at ``t * KEEP + popcount`` of the
    token's earlier halves (a per-thread scan over ``D / 32`` words), so no offsets are stored or loaded.
    """
    tok = tl.arange(0, BLOCK_N)
    halves = _halves(bm_ptr, n0 + tok, n0 + tok < n_end, D, BLOCK_N, MASKED)
    cnt = _popcount32(halves, HW_POPC)
    first = tok[:, None] * KEEP + tl.cumsum(cnt, 1) - cnt
    if PAIRS and not MASKED:
        # 16-bit values of a whole block, 4-byte aligned (the launcher checks): read as int32 pairs
        cw = tl.arange(0, CHUNK // 2)
        src32 = tl.load((val_ptr + n0 * KEEP).to(tl.pointer_type(tl.int32)) + cw, mask=cw < BLOCK_N * KEEP // 2,
                        other=0)
        return _expand_pairs(halves, first, _sliding_pairs(src32, CHUNK // 2), BLOCK_N, D,
                             val_ptr.dtype.element_ty, HW_POPC)
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
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HW_POPC: tl.constexpr, PAIRS: tl.constexpr = False):
    """Dense ``[BLOCK_N, D]`` block of tokens ``n0 ..`` (zeros where pruned and past ``n_end``).

    ``KEEP > 0``: format 2 (``off_ptr`` unused; ``MASKED`` False only for whole blocks, whose loads then carry
    no token mask). ``KEEP == 0``: version 1 through ``off_ptr``.
    """
    if KEEP > 0:
        x = _decode_derived(bm_ptr, val_ptr, n0, n_end, KEEP, CHUNK, D, BLOCK_N, MASKED, HW_POPC, PAIRS)
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        x = _decode_by_offsets(bm_ptr, off_ptr, val_ptr, offs_n, offs_n < n_end, D, BLOCK_N, HW_POPC)
    return x
