"""``y = x @ W^T (+ bias)`` with ``W`` stored packed 2:4, for decode-sized ``x`` (a few rows).

``W`` is given as ``values [N, K/2]`` (fp16/bf16) and ``meta [N, ceil(K/32)]`` int32, in the layout documented
in :mod:`llmprune.formats.sparse24` (value ``j`` of a row sits at column ``4 * (j // 2) + p``, ``p`` = the 2-bit field
at bits ``2 * (j % 16)`` of word ``j // 16``). The kernel reads the packed bytes only (56.25% of the dense
weight), which is what makes it faster than cuBLAS at batch size 1, where a linear is memory bound.

Kernel (one launch per call): each program owns ``BLOCK_N`` output features x ``BLOCK_M`` input rows and walks its
share of the ``K / 4`` groups, ``BLOCK_G`` groups (``4 * BLOCK_G`` input columns) at a time, in a ``tl.range`` loop
with ``num_stages`` pipelined (``cp.async``) loads. The main loop covers whole blocks only and is unmasked (rows past
``N`` / ``M`` re-read the last row, never stored), so its loads are 16-byte vectors whatever ``K`` is; one masked
step takes the tail. Per step it loads the values tile ``[BLOCK_N, 2 * BLOCK_G]``, the metadata words
``[BLOCK_N, BLOCK_G / 8]`` and the input ``x[:, 4 * g0 : 4 * (g0 + BLOCK_G)]`` contiguously, splits them into the two
kept values ``v0, v1`` / positions ``i0, i1`` of every group and the four slices ``x[:, 4g + p]``. Then either

* ``USE_DOT=False`` (1-2 rows): selects ``x[:, 4g + i0]`` / ``x[:, 4g + i1]`` with ``where`` and accumulates
  ``v0 * x_i0 + v1 * x_i1`` into an fp32 ``[BLOCK_M, BLOCK_N, BLOCK_G]`` tile (two FMAs, no cross-lane traffic),
  reduced over the groups once after the loop, or
* ``USE_DOT=True`` (more rows): expands the weight into the four dense slices ``W[:, 4g + p]`` and accumulates
  ``sum_p dot(x[:, 4g + p], W[:, 4g + p]^T)`` on tensor cores.

Accumulation is fp32. With ``SPLIT_K > 1`` (only when the output tiles alone would leave SMs idle) the group range is
split across programs; each stores an fp32 partial and bumps its tile's arrival counter, and the last to arrive adds
the others, the bias, casts and stores, then resets the counter (:func:`kernels._device.arrival_counters`).
:func:`sparse24_config` (in ``_sparse24_config``) is the launcher's config as a pure function; :func:`check_config`
refuses configs the kernel cannot take or whose shared memory the GPU cannot grant, before launching.

The launcher runs the kernel for any number of rows; choosing it over unpack + dense matmul (which wins once the
op is compute bound, e.g. at prefill) is the caller's decision (:mod:`llmprune.runtime.kernel_policy`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from llmprune.formats.sparse24 import meta_words, unpack_24

from ._device import arrival_counters, device_info
from ._sparse24_config import CONFIG_KEYS, candidates, check_config, shared_bytes, sparse24_config  # noqa: F401


@triton.jit
def _sparse24_step(acc, v_rows, m_rows, x_rows, g0, g_end, n_words,
                   MASKED: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_G: tl.constexpr, DOT_FP32: tl.constexpr):
    """One ``BLOCK_G``-group step; ``MASKED`` only for the tail (so the main loop's loads stay 16-byte vectors)."""
    BLOCK_J: tl.constexpr = 2 * BLOCK_G
    BLOCK_W: tl.constexpr = BLOCK_G // 8
    j = 2 * g0 + tl.arange(0, BLOCK_J)
    w = g0 // 8 + tl.arange(0, BLOCK_W)
    c = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
    if MASKED:
        vals = tl.load(v_rows + j[None, :], mask=(j < 2 * g_end)[None, :], other=0.0)
        words = tl.load(m_rows + w[None, :], mask=(w < n_words)[None, :], other=0)
        xs = tl.load(x_rows + c[None, :], mask=(c < 4 * g_end)[None, :], other=0.0)
    else:
        vals = tl.load(v_rows + j[None, :])
        words = tl.load(m_rows + w[None, :])
        xs = tl.load(x_rows + c[None, :])
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_G, 2)))  # the two kept values of every group
    nib = tl.reshape((words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15, (BLOCK_N, BLOCK_G))
    i0 = nib & 3  # position of v0 in its group: 0..2
    i1 = (nib >> 2) & 3  # position of v1: 1..3
    x02, x13 = tl.split(tl.reshape(xs, (BLOCK_M, BLOCK_G, 2, 2)))  # [.., 2] = columns (4g, 4g+2) / (4g+1, 4g+3)
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    if USE_DOT:
        zero = tl.zeros_like(v0)
        d0 = tl.where(i0 == 0, v0, zero)
        d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        d3 = tl.where(i1 == 3, v1, zero)
        if DOT_FP32:  # Triton's CPU interpreter mis-multiplies bf16 in tl.dot; exact in fp32 there
            x0, x1, x2, x3 = x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
            d0, d1, d2, d3 = d0.to(tl.float32), d1.to(tl.float32), d2.to(tl.float32), d3.to(tl.float32)
        acc = tl.dot(x0, tl.trans(d0), acc)
        acc = tl.dot(x1, tl.trans(d1), acc)
        acc = tl.dot(x2, tl.trans(d2), acc)
        acc = tl.dot(x3, tl.trans(d3), acc)
    else:
        a0 = x0[:, None, :].to(tl.float32)
        a1 = x1[:, None, :].to(tl.float32)
        a2 = x2[:, None, :].to(tl.float32)
        a3 = x3[:, None, :].to(tl.float32)
        s0 = tl.where(i0[None, :, :] == 0, a0, tl.where(i0[None, :, :] == 1, a1, a2))
        s1 = tl.where(i1[None, :, :] == 3, a3, tl.where(i1[None, :, :] == 2, a2, a1))
        # [BLOCK_M, BLOCK_N, BLOCK_G] partial sums: reduced once after the loop, not per step (no shuffles here)
        acc = acc + v0[None, :, :].to(tl.float32) * s0
        acc = acc + v1[None, :, :].to(tl.float32) * s1
    return acc

@triton.jit
def _sparse24_store(acc, b_ptr, y_ptr, offs_m, offs_n, N, out_mask, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _sparse24_linear_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, BLOCKS_PER_SPLIT,
    stride_xm, stride_vn, stride_mn, stride_ym, stride_ws,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    # Rows past the end re-read the last row (never stored), so no load needs a row mask.
    rows_n = tl.minimum(offs_n, N - 1)
    rows_m = tl.minimum(offs_m, M - 1)
    n_groups = K // 4
    n_words = (K // 2 + 15) // 16
    g_start = pid_k * BLOCKS_PER_SPLIT * BLOCK_G
    g_end = tl.minimum(g_start + BLOCKS_PER_SPLIT * BLOCK_G, n_groups)
    g_full = g_start + (g_end - g_start) // BLOCK_G * BLOCK_G  # whole blocks: the unmasked main loop

    v_rows = v_ptr + rows_n[:, None].to(tl.int64) * stride_vn
    m_rows = meta_ptr + rows_n[:, None].to(tl.int64) * stride_mn
    x_rows = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g0 in tl.range(g_start, g_full, BLOCK_G, num_stages=NUM_STAGES):
        acc = _sparse24_step(acc, v_rows, m_rows, x_rows, g0, g_end, n_words, False, USE_DOT,
                             BLOCK_M, BLOCK_N, BLOCK_G, DOT_FP32)
    if g_full < g_end:
        acc = _sparse24_step(acc, v_rows, m_rows, x_rows, g_full, g_end, n_words, True, USE_DOT,
                             BLOCK_M, BLOCK_N, BLOCK_G, DOT_FP32)
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=2)

    if SPLIT_K == 1:
        _sparse24_store(out, b_ptr, y_ptr, offs_m, offs_n, N, out_mask, stride_ym, HAS_BIAS)
    else:
        # Split-K finished in the same launch: every split stores its fp32 partial, then bumps the tile's arrival
        # counter; the last to arrive adds the others' partials, writes y and resets the counter for the next call.
        mn = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * stride_ws + mn, out, mask=out_mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            for s in range(0, SPLIT_K):
                if s != pid_k:
                    out += tl.load(ws_ptr + s * stride_ws + mn, mask=out_mask, other=0.0, cache_modifier=".cg")
            _sparse24_store(out, b_ptr, y_ptr, offs_m, offs_n, N, out_mask, stride_ym, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


#: True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module loaded).
_INTERPRETED = not isinstance(_sparse24_linear_kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------- configs (pure ones: _sparse24_config)


def heuristic_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """:func:`sparse24_config` for ``device`` (block sizes / split-K from the shape, no benchmarking); a new dict."""
    return dict(_heuristic(m, n, k, device.type, device.index))


@functools.lru_cache(maxsize=4096)
def _heuristic(m: int, n: int, k: int, kind: str, index: int | None) -> tuple:
    device = torch.device(kind, index) if index is not None else torch.device(kind)
    return tuple(sparse24_config(m, n, k, num_sms=device_info(device)[0]).items())


_TUNED: dict[tuple, dict] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("LLMPRUNE_SPARSE24_AUTOTUNE", "0") not in ("", "0", "false", "False")


def tune(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias=None, verbose: bool = False) -> dict:
    """Benchmark the candidate configs for this shape (CUDA only); cache and return the fastest."""
    from triton.testing import do_bench

    m, k = x.shape
    n = values.shape[0]
    key = (triton.next_power_of_2(m), n, k, x.dtype, x.device.index)
    best, best_t = None, float("inf")
    for cfg in candidates(m):
        if cfg["SPLIT_K"] > 1 and (k // 4) // cfg["SPLIT_K"] < cfg["BLOCK_G"]:
            continue
        try:
            t = do_bench(lambda c=cfg: _launch(x, values, meta, bias, None, c), warmup=5, rep=20)
        except Exception as exc:  # a config that does not compile (shared memory, registers) is skipped
            if verbose:
                print(f"skip {cfg}: {type(exc).__name__}")
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        best = heuristic_config(m, n, k, x.device)
    _TUNED[key] = best
    return best


def _config(x: torch.Tensor, n: int) -> dict:
    m, k = x.shape
    if _TUNED:
        cfg = _TUNED.get((triton.next_power_of_2(m), n, k, x.dtype, x.device.index))
        if cfg is not None:
            return cfg
    return dict(_heuristic(m, n, k, x.device.type, x.device.index))


# --------------------------------------------------------------------------- launcher


def _check(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias, out) -> None:
    if x.dim() != 2 or values.dim() != 2 or meta.dim() != 2:
        raise ValueError(f"expected x [M, K], values [N, K/2], meta [N, K/32]; got {tuple(x.shape)}, "
                         f"{tuple(values.shape)}, {tuple(meta.shape)}")
    m, k = x.shape
    n = values.shape[0]
    if k % 4 or values.shape[1] * 2 != k:
        raise ValueError(f"x has K={k} columns but values {tuple(values.shape)} holds K/2 per row (K % 4 == 0)")
    if meta.shape != (n, meta_words(k)) or meta.dtype != torch.int32:
        raise ValueError(f"meta must be int32 [{n}, {meta_words(k)}], got {meta.dtype} {tuple(meta.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or values.dtype != x.dtype:
        raise ValueError(f"x and values must share dtype float16 or bfloat16, got {x.dtype} / {values.dtype}")
    devs = {x.device, values.device, meta.device}
    if bias is not None:
        if bias.shape != (n,) or bias.dtype != x.dtype:
            raise ValueError(f"bias must be [{n}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
        devs.add(bias.device)
    if out is not None:
        if out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
        devs.add(out.device)
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    if x.stride(1) != 1 or not values.is_contiguous() or not meta.is_contiguous():
        raise ValueError("x must have contiguous rows, values and meta must be contiguous")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias must be contiguous")


def _launch(x, values, meta, bias, out, cfg: dict) -> torch.Tensor:
    m, k = x.shape
    n = values.shape[0]
    check_config(cfg, device_info(x.device)[1])
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(k // 4, cfg["BLOCK_G"])
    blocks_per_split = triton.cdiv(blocks, cfg["SPLIT_K"])
    split = triton.cdiv(blocks, blocks_per_split)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        cnt = arrival_counters(x.device, grid[0] * grid[2])
    else:
        ws = cnt = values
    _sparse24_linear_kernel[grid](
        x, values, meta, bias if bias is not None else values, out, ws, cnt,
        m, n, k, blocks_per_split,
        x.stride(0), values.stride(0), meta.stride(0), out.stride(0), ws.stride(0) if split > 1 else 0,
        HAS_BIAS=bias is not None, SPLIT_K=split, USE_DOT=cfg["USE_DOT"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], NUM_STAGES=cfg["num_stages"],
        DOT_FP32=_INTERPRETED, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def sparse24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    check: bool = True,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a packed 2:4 ``W``.

    Args:
        x: ``[M, K]`` fp16/bf16, rows contiguous.
        values: ``[N, K/2]``, same dtype, contiguous.
        meta: ``[N, ceil(K/32)]`` int32, contiguous.
        bias: optional ``[N]``, same dtype.
        out: optional contiguous ``[M, N]`` output (same dtype), overwritten.
        config: kernel config override (see :func:`heuristic_config`); default: the tuned one for this shape
            if :func:`tune` ran (or ``LLMPRUNE_SPARSE24_AUTOTUNE=1``), else the heuristic.
        check: validate the arguments (``Sparse24Linear`` skips it: its tensors are consistent by construction,
            and the checks cost host time per decode step).

    Returns:
        ``[M, N]`` in ``x.dtype`` (``out`` when given).

    Raises:
        ValueError: (with ``check``) on shapes, dtypes, devices or strides the kernel does not take.
    """
    if check:
        _check(x, values, meta, bias, out)
    m, k = x.shape
    if m == 0:
        return out if out is not None else x.new_empty((0, values.shape[0]))
    if config is None:
        if x.is_cuda and _autotune_enabled():
            key = (triton.next_power_of_2(m), values.shape[0], k, x.dtype, x.device.index)
            if key not in _TUNED:
                tune(x, values, meta, bias)
        config = _config(x, values.shape[0])
    return _launch(x, values, meta, bias, out, config)


def sparse24_linear_ref(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch reference: unpack, fp32 matmul, cast to ``x.dtype``."""
    w = unpack_24(values, meta).float()
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
