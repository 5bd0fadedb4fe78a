"""Launch configuration of the bitmap-KV decode-attention kernel, as pure functions (no device needed).

The launcher (:func:`llmprune.kernels.kv_bitmap_attention.kv_bitmap_attention`), the compile-level tests and
``eval/kernel_report.py`` all choose and check configs through these, so they compile what runs.
"""

from __future__ import annotations

import math

import triton

from ._device import check_shared

#: Most split programs per KV head over the compressed part (the in-kernel combine holds ``[next_pow2(S + 1), d]``).
MAX_SPLITS = 63
#: Accepted ``block_n`` (tokens per step): powers of two in this range.
BLOCK_N_RANGE = (16, 128)


def default_block_n(head_dim: int) -> int:
    """Tokens per step: 64 (32 at ``head_dim`` 256, whose dense block would not leave room for 2 CTAs/SM)."""
    return 32 if head_dim > 128 else 64


def default_warps(head_dim: int) -> int:
    """Warps per program: 4; 8 at ``head_dim`` 256; 2 at 64, whose 64-token block would otherwise leave half of the
    expansion layout's threads repeating the others' work (sm_90 issue ceiling 1.65 -> 3.07 TB/s, 4 CTAs/SM)."""
    return 8 if head_dim > 128 else 2 if head_dim <= 64 else 4


def kv_bitmap_config(batch: int, kv_heads: int, group: int, queries: int, n_compressed: int, head_dim: int, *,
                     num_sms: int, block_n: int | None = None, num_splits: int | None = None, k_keep: int = 0,
                     v_keep: int = 0) -> dict:
    """The launcher's config (pure, no device needed): block, splits over the compressed part, warps, stages.

    Splits: enough programs (``batch * kv_heads * (S + 1)``) to give every SM two, at most one per block.
    ``k_keep`` / ``v_keep``: values per token of a format-2 row (0: version 1, stored offsets); a format-2 block's
    values are one run of ``block_n * keep`` values, held in a register tile of ``K_CHUNK`` / ``V_CHUNK`` (the
    next power of two above, so its last entry is a zero the dropped elements read).
    """
    block_n = default_block_n(head_dim) if block_n is None else block_n
    n_blocks = triton.cdiv(n_compressed, block_n)
    programs = batch * kv_heads
    if num_splits is None:
        S = 1 if n_blocks == 0 else max(1, min(n_blocks, math.ceil(2 * num_sms / max(1, programs)), MAX_SPLITS))
    else:
        S = num_splits
    S = max(1, min(S, max(1, n_blocks)))
    blocks_per_split = triton.cdiv(max(n_blocks, 1), S)
    S = triton.cdiv(max(n_blocks, 1), blocks_per_split)
    def chunk(keep: int) -> int:
        return triton.next_power_of_2(block_n * keep + 1) if keep else 1

    return dict(BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(group * queries)), NUM_SPLITS=S,
                BLOCKS_PER_SPLIT=blocks_per_split, PARTS_PAD=triton.next_power_of_2(S + 1), D=head_dim,
                K_KEEP=k_keep, V_KEEP=v_keep, K_CHUNK=chunk(k_keep), V_CHUNK=chunk(v_keep),
                num_warps=default_warps(head_dim), num_stages=2)


def shared_bytes(cfg: dict, itemsize: int) -> int:
    """Upper bound of a config's shared memory (``itemsize``: 4 for fp32 queries, whose tiles stay fp32), fitted
    above the compiled kernels (d 64-256, block_n 16-128, bf16 and fp32; ``tests/kernels/test_compiled.py``)."""
    bn, d, r = cfg["BLOCK_N"], cfg["D"], cfg["BLOCK_R"]
    return 4 * itemsize * bn * d + 8 * r * max(bn, d) + 8192


def check_config(cfg: dict, itemsize: int, arch: int) -> None:
    """Raise ``ValueError`` for a block size or split count the kernel does not take, or too much shared memory."""
    bn = cfg["BLOCK_N"]
    lo, hi = BLOCK_N_RANGE
    if not isinstance(bn, int) or bn < lo or bn > hi or bn & (bn - 1):
        raise ValueError(f"kv_bitmap_attention: block_n must be a power of two in [{lo}, {hi}], got {bn!r}")
    if cfg["NUM_SPLITS"] > MAX_SPLITS:
        raise ValueError(f"kv_bitmap_attention: num_splits must be <= {MAX_SPLITS}, got {cfg['NUM_SPLITS']}")
    check_shared("kv_bitmap_attention", shared_bytes(cfg, itemsize), arch,
                 f"use a smaller block_n (got {bn}) for head_dim {cfg['D']}"
                 + (" or 16-bit queries" if itemsize > 2 else ""))
