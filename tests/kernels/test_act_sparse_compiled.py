"""Compile-level checks of the input-sparse GEMV (``pytest -m compile``; no GPU, see ``eval/kernel_compile.py``).

Compiled ahead of time for sm_80 / sm_90 through its own launcher at the Llama-3-8B decode shapes: one launch per
call (split-K finished in-kernel), no spills, the kept rows of ``W^T`` streamed as 16-byte cp.async vectors (the
row mask is constant along ``N``), no cross-lane traffic in the M=1 loop, and an M=1 main loop short enough
that its issue-limited ceiling clears 1.5x the bandwidth the GPU goal needs (``eval/kernel_report.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import kernel_compile as kc  # noqa: E402
import kernel_report as kr  # noqa: E402

pytestmark = pytest.mark.compile

SHAPES = list(kc.SPARSE24_SHAPES.values())  # (N, K) = (out, in) of the Llama-3-8B linears


def _jobs() -> list[tuple]:
    jobs = [kc.job("act_sparse_gemv", 90, n=n, k=k) for n, k in SHAPES]
    jobs += [kc.job("act_sparse_gemv", 80, n=4096, k=4096), kc.job("act_sparse_gemv", 90, n=4096, k=4100),
             kc.job("act_sparse_gemv", 90, n=4096, k=14336, m=4)]
    return jobs


@pytest.fixture(scope="module")
def built():
    try:
        kc._bin("nvdisasm")
        kc._bin("cuobjdump")
        return kc.compile_jobs(_jobs())
    except kc.CompileUnavailable as exc:
        pytest.skip(str(exc))


def _check(launches, arch: int, m: int = 1):
    assert not isinstance(launches, ValueError), launches
    assert len(launches) == 1, f"{[c.name for c in launches]}: one launch per call"
    (c,) = launches
    assert c.local_bytes == 0 and c.spill_ops == 0, f"{c.local_bytes} B local memory, {c.spill_ops} spill ops"
    assert c.shared <= kc.SMEM_LIMIT[arch]
    k = c.constexprs
    loop = c.main_loop
    assert loop is not None
    need = k["BLOCK_K"] * k["BLOCK_N"] * 2 // (32 * c.num_warps) // 16  # 16-byte vectors of W^T per thread
    assert loop.vector_loads(128) >= need, f"kept rows not in 16-byte vectors: {loop.global_loads()}"
    assert loop.count("LDGSTS") >= need, f"W^T loads are not pipelined (cp.async): {loop.global_loads()}"
    # x: M > 1 loads one vector of the slice per row; M = 1 loads each thread's own inputs (BLOCK_K / warps,
    # warp-uniform addresses, so one transaction each), which keeps the loop free of a layout conversion
    x_loads = k["BLOCK_M"] if m > 1 else k["BLOCK_K"] // c.num_warps
    assert loop.narrow_loads(32) <= x_loads, f"narrow loads beyond the x slice: {loop.global_loads()}"
    if m == 1:
        assert loop.count("SHFL") == 0, "cross-lane traffic in the M=1 main loop"
    return c


@pytest.mark.parametrize("n,k", SHAPES)
def test_decode_main_loop_sm90(built, n, k):
    c = _check(built[kc.job("act_sparse_gemv", 90, n=n, k=k)], 90)
    assert c.constexprs["SPLIT_K"] * -(-n // c.constexprs["BLOCK_N"]) >= 2 * 132  # every SM has work


def test_decode_main_loop_sm80(built):
    _check(built[kc.job("act_sparse_gemv", 80, n=4096, k=4096)], 80)


def test_vectorization_does_not_depend_on_the_k_tail(built):
    _check(built[kc.job("act_sparse_gemv", 90, n=4096, k=4100)], 90)


def test_four_rows(built):
    c = _check(built[kc.job("act_sparse_gemv", 90, n=4096, k=14336, m=4)], 90, m=4)
    assert c.constexprs["BLOCK_M"] == 4


@pytest.mark.parametrize("label", list(kc.SPARSE24_SHAPES))
def test_m1_issue_ceiling_clears_the_goal_bandwidth(built, label):
    """sm_90, M = 1 at 50% activation sparsity: the loop issues fast enough to stream >= 1.5x the bandwidth that
    1.6x dense GEMV needs on an H200 (a static bound: it ignores latency, it is not a speed measurement)."""
    n, k = kc.SPARSE24_SHAPES[label]
    (c,) = built[kc.job("act_sparse_gemv", 90, n=n, k=k)]
    need = next(r["need"]["H200"] for r in kr.roofline() if r["point"] == f"act-sparse 50% M=1 {label}")
    ceiling = kr._ceiling(c, kr._iter_bytes("act_sparse", c))
    assert ceiling >= 1.5 * need, f"issue ceiling {ceiling:.2f} TB/s < 1.5 x {need:.2f}"
