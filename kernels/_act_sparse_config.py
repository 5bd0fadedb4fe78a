"""Launch configuration of the input-sparse GEMV kernel, as pure functions (no device needed).

The launcher (:func:`llmprune.kernels.act_sparse_gemv.act_sparse_gemv`), the compile-level tests and
``eval/kernel_report.py`` all choose and check configs through these, so they compile what runs.
"""

from __future__ import annotations

import triton

from ._device import check_keys_pow2

#: Most input rows the launcher takes (the partial-product tile holds every row).
MAX_ROWS = 8

#: Keys of a kernel config (``act_sparse_config``, the ``config=`` argument).
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


def act_sparse_config(m: int, n: int, k: int, *, num_sms: int) -> dict:
    """The launcher's config for ``x [m, k] @ wt [k, n]`` on a GPU with ``num_sms`` SMs (pure; no device needed).

    ``BLOCK_N = 256`` output features (a 512-byte contiguous row slice per kept input in 16-bit), 4 warps, and
    ``BLOCK_M * BLOCK_K = 32`` so the partial-product tile stays at 64 fp32 registers per thread whatever ``m``
    (of the configs compiled for sm_90 this one has the highest issue ceiling, ``eval/kernel_report.py``: fewer
    address/predicate instructions per weight than ``BLOCK_N = 128``); split-K (finished in the same launch)
    until every SM has two programs, each still looping over >= 4 steps.
    """
    bm = triton.next_power_of_2(max(1, m))
    cfg = dict(BLOCK_M=bm, BLOCK_N=256, BLOCK_K=max(4, 32 // bm), num_warps=4, num_stages=3)
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    blocks = triton.cdiv(k, cfg["BLOCK_K"])
    split = 1
    while tiles * split < 2 * num_sms and blocks // (split * 2) >= 4 and split < 64:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


def check_config(cfg: dict, m: int) -> None:
    """Raise ``ValueError`` for a config the kernel cannot take (``m`` rows)."""
    pow2 = check_keys_pow2("act_sparse_gemv", cfg, CONFIG_KEYS, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"))
    if cfg["BLOCK_M"] < m or cfg["BLOCK_M"] > MAX_ROWS:
        raise ValueError(f"act_sparse_gemv config: BLOCK_M must cover the {m} rows and be <= {MAX_ROWS}")
    if cfg["BLOCK_M"] * cfg["BLOCK_K"] * cfg["BLOCK_N"] > 64 * 32 * cfg["num_warps"]:
        raise ValueError(f"act_sparse_gemv config: partial-product tile {pow2} over 64 registers per thread")
    if not 1 <= cfg["SPLIT_K"] <= 64 or cfg["num_stages"] < 1:
        raise ValueError(f"act_sparse_gemv config: SPLIT_K must be in [1, 64], num_stages >= 1, got {cfg}")
