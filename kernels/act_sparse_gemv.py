"""Input-sparse GEMV ``y = sparsify(x) @ W^T (+ bias)`` for decode (``M = 1..8`` rows) with most of ``x`` zeroed.

TEAL ("Training-Free Activation Sparsity in Large Language Models", Liu et al. 2024) zeroes the inputs of every
linear whose magnitude is below a calibrated threshold; at batch size 1 a linear is memory bound, so skipping the
weights of the zeroed inputs is the speed-up. The weight is given *transposed*, ``wt = W^T [K, N]`` row-major
(the runtime re-lays the ``nn.Linear`` weight out once at load, :mod:`llmprune.runtime.actsparse.apply`), so an
input ``k`` selects the contiguous row ``wt[k, :]``: a kept input costs one contiguous read of ``N`` values, a
zeroed one costs nothing.

Kernel (one launch per call): each program owns ``BLOCK_N`` output features of every row and walks its share of
the ``K`` inputs, ``BLOCK_K`` at a time. Per step it loads ``x[:, k0 : k0 + BLOCK_K]`` (all rows), applies the
threshold there (``|x| >= threshold`` in fp32, the mask fused: no separate sparsify pass, no index list), and
loads the ``[BLOCK_K, BLOCK_N]`` tile of ``wt`` with the row mask "some row of ``x`` kept input ``k``" (the union
over the ``M`` rows), so a zeroed input's weight row is never read (predicated-off loads issue no memory traffic;
the mask is constant along ``N``, so the kept rows still load as 16-byte vectors). Accumulation is fp32 into a
``[BLOCK_M, BLOCK_K, BLOCK_N]`` tile of partial products, reduced over ``K`` once after the loop (no cross-lane
traffic in the loop). With ``SPLIT_K > 1`` (when the output tiles alone would leave SMs idle) the input range is
split across programs; each stores an fp32 partial and bumps its tile's arrival counter, and the last to arrive
adds the others, the bias, casts and stores (:func:`kernels._device.arrival_counters`, as the 2:4 kernel).

One row (``M = 1``, the decode case) runs on 2-d ``[BLOCK_K, BLOCK_N]`` tiles in the weight load's own layout
(no layout conversion between the pipelined load and the FMAs: the weights leave shared memory as 16-byte vectors),
with 32-bit row offsets when ``wt`` has fewer than 2**31 elements, and in bf16 reads ``wt`` as int32 words of two
columns, each widened to fp32 by one shift or one mask: on sm_90 a 32 x 256 step is 348 SASS instructions, the
3-d tile of ``M > 1`` needs ~490 (``eval/results/kernel_report.md``).

:func:`act_sparse_config` (in ``_act_sparse_config``) is the launcher's config as a pure function;
:func:`check_config` refuses configs the kernel cannot take. Choosing this kernel over ``F.linear`` (prefill,
large ``M``) is the caller's decision (:mod:`llmprune.runtime.kernel_policy`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._act_sparse_config import CONFIG_KEYS, MAX_ROWS, act_sparse_config, check_config  # noqa: F401
from ._device import arrival_counters, device_info


@triton.jit
def _act_sparse_store(acc, b_ptr, y_ptr, offs_m, offs_n, N, out_mask, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _act_sparse_step(acc, x_rows, wt_ptr, k0, k_end, threshold, offs_n, n_ok, stride_wk,
                     MASKED: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``BLOCK_K``-input step; ``MASKED`` only for the tail (so the main loop's ``x`` loads stay vectors)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if MASKED:
        k_ok = ks < k_end
        xs = tl.load(x_rows + ks[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
    else:
        xs = tl.load(x_rows + ks[None, :]).to(tl.float32)
    keep = tl.abs(xs) >= threshold  # the TEAL threshold, fused
    xs = tl.where(keep, xs, 0.0)
    row_keep = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some row keeps input k
    if MASKED:
        row_keep = row_keep & k_ok
    # a zeroed input's row of W^T is never read; the mask is constant along N, so kept rows load as vectors
    w = tl.load(wt_ptr + ks[:, None].to(tl.int64) * stride_wk + offs_n[None, :],
                mask=row_keep[:, None] & n_ok[None, :], other=0.0)
    return acc + xs[:, :, None] * w[None, :, :].to(tl.float32)


@triton.jit
def _rows(ks, WIDE: tl.constexpr):
    """``ks [BLOCK_K]`` as a column of row indices, int64 when ``WIDE``."""
    if WIDE:
        r = ks[:, None].to(tl.int64)
    else:
        r = ks[:, None]
    return r


@triton.jit
def _row_step(acc_lo, acc_hi, x_ptrs, w_ptrs, ks, k_end, threshold, cols_ok,
              MASKED: tl.constexpr, PAIRS: tl.constexpr):
    """One ``BLOCK_K``-input step of one row (``M = 1``) on 2-d ``[BLOCK_K, columns]`` tiles.

    The tiles, the ``x`` slice and the weight load share one layout: a thread holds whole 16-byte runs of its
    weight rows and only the inputs of those rows, so the pipelined weights leave shared memory as vectors and
    each input is thresholded once per thread, not once per element. ``PAIRS`` (bf16): ``w_ptrs`` address
    int32 words of two adjacent bf16 columns, widened by one shift / one mask each (a bf16 is the top half of
    its fp32), accumulated in ``acc_lo`` (even columns) and ``acc_hi`` (odd); otherwise ``acc_hi`` is unused.
    """
    if MASKED:
        k_ok = ks < k_end
        xs = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        keep = (tl.abs(xs) >= threshold) & k_ok
    else:
        xs = tl.load(x_ptrs).to(tl.float32)
        keep = tl.abs(xs) >= threshold
    w = tl.load(w_ptrs, mask=keep[:, None] & cols_ok[None, :], other=0)
    xk = tl.where(keep, xs, 0.0)[:, None]
    if PAIRS:
        acc_lo += xk * (w << 16).to(tl.float32, bitcast=True)
        acc_hi += xk * (w & -65536).to(tl.float32, bitcast=True)
    else:
        acc_lo += xk * w.to(tl.float32)
    return acc_lo, acc_hi


@triton.jit
def _row_gemv(x_ptr, wt_ptr, k_start, k_full, k_end, threshold, pid_n, N, stride_wk,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, PAIRS: tl.constexpr,
              WIDE: tl.constexpr):
    """``[BLOCK_N]`` fp32 partial of one row over inputs ``k_start .. k_end`` (``stride_wk`` in words).

    ``WIDE``: 64-bit element offsets into ``wt``; otherwise 32-bit (the launcher's choice when ``wt`` has fewer
    than 2**31 elements), which saves the 64-bit multiply-add of every row address in the loop.
    """
    COLS: tl.constexpr = BLOCK_N // 2 if PAIRS else BLOCK_N
    offs_c = pid_n * COLS + tl.arange(0, COLS)
    cols_ok = offs_c < (N // 2 if PAIRS else N)
    if PAIRS:
        wt_ptr = wt_ptr.to(tl.pointer_type(tl.int32))
    acc_lo = tl.zeros((BLOCK_K, COLS), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_K, COLS), dtype=tl.float32)
    for k0 in tl.range(k_start, k_full, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        w_ptrs = wt_ptr + _rows(ks, WIDE) * stride_wk + offs_c[None, :]
        acc_lo, acc_hi = _row_step(acc_lo, acc_hi, x_ptr + ks, w_ptrs, ks, k_end, threshold, cols_ok, False, PAIRS)
    if k_full < k_end:
        ks = k_full + tl.arange(0, BLOCK_K)
        w_ptrs = wt_ptr + _rows(ks, WIDE) * stride_wk + offs_c[None, :]
        acc_lo, acc_hi = _row_step(acc_lo, acc_hi, x_ptr + ks, w_ptrs, ks, k_end, threshold, cols_ok, True, PAIRS)
    if PAIRS:
        out = tl.reshape(tl.join(tl.sum(acc_lo, axis=0), tl.sum(acc_hi, axis=0)), (BLOCK_N,))
    else:
        out = tl.sum(acc_lo, axis=0)
    return out


@triton.jit
def _act_sparse_gemv_kernel(
    x_ptr, wt_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, threshold, BLOCKS_PER_SPLIT,
    stride_xm, stride_wk, stride_ym, stride_ws,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PAIRS: tl.constexpr, WIDE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    out_mask = (offs_m < M)[:, None] & n_ok[None, :]
    # Rows past M re-read the last row (never stored; they add nothing new to the kept-input union).
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None].to(tl.int64) * stride_xm
    k_start = pid_k * BLOCKS_PER_SPLIT * BLOCK_K
    k_end = tl.minimum(k_start + BLOCKS_PER_SPLIT * BLOCK_K, K)

    k_full = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K  # whole blocks: the main loop, no K mask on x

    if BLOCK_M == 1:
        out = _row_gemv(x_ptr, wt_ptr, k_start, k_full, k_end, threshold, pid_n, N, stride_wk // (2 if PAIRS else 1),
                        BLOCK_N, BLOCK_K, NUM_STAGES, PAIRS, WIDE)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_start, k_full, BLOCK_K, num_stages=NUM_STAGES):
            acc = _act_sparse_step(acc, x_rows, wt_ptr, k0, k_end, threshold, offs_n, n_ok, stride_wk, False,
                                   BLOCK_K)
        if k_full < k_end:
            acc = _act_sparse_step(acc, x_rows, wt_ptr, k_full, k_end, threshold, offs_n, n_ok, stride_wk, True,
                                   BLOCK_K)
        out = tl.sum(acc, axis=1)

    if SPLIT_K == 1:
        _act_sparse_store(out, b_ptr, y_ptr, offs_m, offs_n, N, out_mask, stride_ym, HAS_BIAS)
    else:
        # Split-K finished in the same launch (see the module doc).
        mn = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * stride_ws + mn, out, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            for s in range(0, SPLIT_K):
                if s != pid_k:
                    out += tl.load(ws_ptr + s * stride_ws + mn, mask=out_mask, other=0.0, cache_modifier=".cg")
            _act_sparse_store(out, b_ptr, y_ptr, offs_m, offs_n, N, out_mask, stride_ym, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# --------------------------------------------------------------------------- launcher

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, wt: torch.Tensor, threshold: float, bias, out) -> None:
    if x.dim() != 2 or wt.dim() != 2:
        raise ValueError(f"expected x [M, K] and wt [K, N]; got {tuple(x.shape)}, {tuple(wt.shape)}")
    m, k = x.shape
    n = wt.shape[1]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"act_sparse_gemv takes 1..{MAX_ROWS} rows (decode), got {m}; use F.linear")
    if wt.shape[0] != k:
        raise ValueError(f"x has K={k} columns but wt is {tuple(wt.shape)} (expected [K, N] = W^T)")
    if x.dtype not in _DTYPES or wt.dtype != x.dtype:
        raise ValueError(f"x and wt must share dtype float16, bfloat16 or float32, got {x.dtype} / {wt.dtype}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0 (inf zeroes every input), got {threshold!r}")
    devs = {x.device, wt.device}
    if bias is not None:
        if bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous [{n}] {x.dtype} tensor, got {tuple(bias.shape)} {bias.dtype}")
        devs.add(bias.device)
    if out is not None:
        if out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
        devs.add(out.device)
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    if x.stride(1) != 1 or not wt.is_contiguous():
        raise ValueError("x must have contiguous rows and wt must be contiguous (W^T row-major: weight.t() of a "
                         "column-major weight)")


def _launch(x, wt, threshold: float, bias, out, cfg: dict) -> torch.Tensor:
    m, k = x.shape
    n = wt.shape[1]
    check_config(cfg, m)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(k, cfg["BLOCK_K"])
    blocks_per_split = triton.cdiv(blocks, cfg["SPLIT_K"])
    split = triton.cdiv(blocks, blocks_per_split)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        cnt = arrival_counters(x.device, grid[0])
    else:
        ws = cnt = wt
    _act_sparse_gemv_kernel[grid](
        x, wt, bias if bias is not None else wt, out, ws, cnt,
        m, n, k, float(threshold), blocks_per_split,
        x.stride(0), wt.stride(0), out.stride(0), ws.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["num_stages"],
        PAIRS=cfg["BLOCK_M"] == 1 and x.dtype == torch.bfloat16 and n % 2 == 0 and wt.data_ptr() % 4 == 0,
        WIDE=wt.numel() >= 2**31,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def act_sparse_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    check: bool = True,
) -> torch.Tensor:
    """``where(|x| < threshold, 0, x) @ wt (+ bias)``, reading only the rows of ``wt`` of kept inputs.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32, ``1 <= M <= MAX_ROWS``, rows contiguous.
        wt: ``[K, N]`` = ``W^T``, same dtype, contiguous.
        threshold: magnitude threshold (compared with ``|x|`` in fp32; ``0`` keeps everything, ``inf`` nothing).
        bias: optional ``[N]``, same dtype.
        out: optional contiguous ``[M, N]`` output (same dtype), overwritten.
        config: kernel config override (see :func:`act_sparse_config`).
        check: validate the arguments (the runtime skips it: its tensors are consistent by construction).

    Returns:
        ``[M, N]`` in ``x.dtype`` (``out`` when given).

    Raises:
        ValueError: (with ``check``) on shapes, dtypes, devices, strides or thresholds the kernel does not take.
    """
    if check:
        _check(x, wt, threshold, bias, out)
    if config is None:
        config = act_sparse_config(x.shape[0], wt.shape[1], x.shape[1], num_sms=device_info(x.device)[0])
    return _launch(x, wt, threshold, bias, out, config)


def act_sparse_gemv_ref(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch reference: zero ``|x| < threshold`` (fp32 compare), fp32 matmul, cast to ``x.dtype``."""
    xf = x.float()
    xf = torch.where(xf.abs() < threshold, torch.zeros_like(xf), xf)
    y = xf @ wt.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
