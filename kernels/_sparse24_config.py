"""Launch configuration of the packed 2:4 linear kernel, as pure functions (no device needed).

The launcher (:func:`llmprune.kernels.sparse24_linear.sparse24_linear`), its autotuner, the compile-level tests
and ``eval/kernel_report.py`` all choose and check configs through these, so they compile what runs.
"""

from __future__ import annotations

import triton

from ._device import check_keys_pow2, check_shared

#: Keys of a kernel config (``heuristic_config``, ``tune``, the ``config=`` argument).
CONFIG_KEYS = ("USE_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_G", "SPLIT_K", "num_warps", "num_stages")


def sparse24_config(m: int, n: int, k: int, *, num_sms: int) -> dict:
    """The launcher's config for ``x [m, k] @ W[n, k]^T`` on a GPU with ``num_sms`` SMs (pure; no device needed).

    One row (decode): no tensor cores, ``BLOCK_N`` 16 or 32 rows of ``W`` per program, 128 groups (512 input
    columns) per step, 3-stage pipelined loads; split-K (finished in the same launch) only when the output tiles
    alone leave SMs idle.
    """
    if m <= 2:
        bn = 32 if triton.cdiv(n, 32) >= 2 * num_sms else 16
        cfg = dict(USE_DOT=False, BLOCK_M=1 if m == 1 else 2, BLOCK_N=bn, BLOCK_G=128 if m == 1 else 64,
                   num_warps=4, num_stages=3)
    else:
        cfg = dict(USE_DOT=True, BLOCK_M=16, BLOCK_N=64, BLOCK_G=32, num_warps=4, num_stages=3)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"])
    blocks = triton.cdiv(k // 4, cfg["BLOCK_G"])
    split = 1
    # Fill every SM at least once, each split still looping over >= 4 blocks of groups.
    while tiles * split < num_sms and blocks // (split * 2) >= 4:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


def shared_bytes(cfg: dict, itemsize: int = 2) -> int:
    """Upper bound of the shared memory a config uses: its pipeline buffers plus layout-conversion scratch."""
    bn, bg, bm = cfg["BLOCK_N"], cfg["BLOCK_G"], cfg["BLOCK_M"]
    stage = bn * 2 * bg * itemsize + bn * (bg // 8) * 4 + bm * 4 * bg * itemsize
    scratch = max(bn * bg * 4, bm * bn * 4, bm * 4 * bg * 4)
    return max(1, cfg["num_stages"]) * stage + scratch


def check_config(cfg: dict, arch: int) -> None:
    """Raise ``ValueError`` for a config the kernel cannot take, or whose shared memory ``arch`` cannot grant."""
    pow2 = check_keys_pow2("sparse24_linear", cfg, CONFIG_KEYS, ("BLOCK_M", "BLOCK_N", "BLOCK_G", "num_warps"))
    if cfg["BLOCK_G"] < 8 or cfg["BLOCK_N"] > 256 or cfg["BLOCK_G"] > 512:
        raise ValueError(f"sparse24_linear config: BLOCK_G must be in [8, 512] and BLOCK_N <= 256, got {pow2}")
    if cfg["USE_DOT"] and (cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 16 or cfg["BLOCK_G"] < 16):
        raise ValueError(f"sparse24_linear config: USE_DOT needs BLOCK_M, BLOCK_N, BLOCK_G >= 16, got {pow2}")
    if not cfg["USE_DOT"] and cfg["BLOCK_M"] > 4:
        raise ValueError("sparse24_linear config: without USE_DOT, BLOCK_M must be <= 4")
    if not 1 <= cfg["SPLIT_K"] <= 64 or cfg["num_stages"] < 1:
        raise ValueError(f"sparse24_linear config: SPLIT_K must be in [1, 64], num_stages >= 1, got {cfg}")
    check_shared("sparse24_linear", shared_bytes(cfg), arch, "lower BLOCK_N, BLOCK_G or num_stages")


def candidates(m: int) -> list[dict]:
    """The configs :func:`~llmprune.kernels.sparse24_linear.tune` benchmarks for ``m`` input rows."""
    out = []
    dots = [False] if m <= 2 else [True] if m > 4 else [False, True]
    for use_dot in dots:
        bms = [16] if use_dot else [triton.next_power_of_2(m)]
        for bm in bms:
            for bn in ([16, 32, 64] if not use_dot else [32, 64, 128]):
                for bg in (32, 64, 128):
                    for split in (1, 2, 4, 8):
                        for warps in (4, 8):
                            out.append(dict(USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg, SPLIT_K=split,
                                            num_warps=warps, num_stages=3))
    return out
