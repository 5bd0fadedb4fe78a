"""``y = x @ W^T (+ bias)`` with ``W`` stored packed 2:4, for decode-sized ``x`` (a few rows).

``W`` is given as ``values [N, K/2]`` (fp16/bf16) and ``meta [N, ceil(K/32)]`` int32, in the layout documented
in :mod:`llmprune.formats.sparse24` (value ``j`` of a row sits at column ``4 * (j // 2) + p``, ``p`` = the 2-bit field
at bits ``2 * (j % 16)`` of word ``j // 16``). The kernel reads the packed bytes only (56.25% of the dense
weight), which is what makes it faster than cuBLAS at batch size 1, where a linear is memory bound.

Kernel: each program owns ``BLOCK_N`` output features x ``BLOCK_M`` input rows and walks its share of the
``K / 4`` groups, ``BLOCK_G`` groups (``4 * BLOCK_G`` input columns) at a time. Per step it loads the values
tile ``[BLOCK_N, 2 * BLOCK_G]`` and the metadata words ``[BLOCK_N, BLOCK_G / 8]`` contiguously, splits them
into the two kept values ``v0, v1`` and their positions ``i0, i1`` of every group, and loads the four strided
slices ``x[:, 4g + p]`` (``p = 0..3``) of the input. Then either

* ``USE_DOT=False`` (1-2 rows): selects ``x[:, 4g + i0]`` / ``x[:, 4g + i1]`` with ``where`` and does fp32
  multiply-adds (no tensor cores needed, the op is memory bound), or
* ``USE_DOT=True`` (more rows): expands the weight into the four dense slices ``W[:, 4g + p]`` and accumulates
  ``sum_p dot(x[:, 4g + p], W[:, 4g + p]^T)`` on tensor cores.

Accumulation is fp32. With ``SPLIT_K > 1`` the group range is split across programs that write fp32 partials,
summed (plus bias, cast) by ``_sparse24_reduce_kernel``.

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


@triton.jit
def _sparse24_linear_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    G_PER_SPLIT,
    stride_xm,
    stride_vn,
    stride_mn,
    stride_ys,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    BLOCK_J: tl.constexpr = 2 * BLOCK_G  # packed values per step
    BLOCK_W: tl.constexpr = BLOCK_G // 8  # metadata words per step

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    n_groups = K // 4
    n_words = (K // 2 + 15) // 16
    g_start = pid_k * G_PER_SPLIT
    g_end = tl.minimum(g_start + G_PER_SPLIT, n_groups)

    offs_j = tl.arange(0, BLOCK_J)
    offs_w = tl.arange(0, BLOCK_W)
    offs_g = tl.arange(0, BLOCK_G)
    shifts = 4 * tl.arange(0, 8)

    v_rows = v_ptr + offs_n[:, None].to(tl.int64) * stride_vn
    m_rows = meta_ptr + offs_n[:, None].to(tl.int64) * stride_mn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(g_start, g_end, BLOCK_G):
        j = 2 * g0 + offs_j
        vals = tl.load(v_rows + j[None, :], mask=n_ok[:, None] & (j[None, :] < 2 * g_end), other=0.0)
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_G, 2)))  # [BLOCK_N, BLOCK_G] each

        w = g0 // 8 + offs_w
        words = tl.load(m_rows + w[None, :], mask=n_ok[:, None] & (w[None, :] < n_words), other=0)
        nib = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 15, (BLOCK_N, BLOCK_G))
        i0 = nib & 3
        i1 = (nib >> 2) & 3

        g = g0 + offs_g
        x_mask = m_ok[:, None] & (g[None, :] < g_end)
        xg = x_rows + 4 * g[None, :]
        x0 = tl.load(xg, mask=x_mask, other=0.0)  # [BLOCK_M, BLOCK_G]
        x1 = tl.load(xg + 1, mask=x_mask, other=0.0)
        x2 = tl.load(xg + 2, mask=x_mask, other=0.0)
        x3 = tl.load(xg + 3, mask=x_mask, other=0.0)

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
            # i0 < i1 always, so i0 is in 0..2 and i1 in 1..3.
            a0 = x0[:, None, :].to(tl.float32)
            a1 = x1[:, None, :].to(tl.float32)
            a2 = x2[:, None, :].to(tl.float32)
            a3 = x3[:, None, :].to(tl.float32)
            s0 = tl.where(i0[None, :, :] == 0, a0, tl.where(i0[None, :, :] == 1, a1, a2))
            s1 = tl.where(i1[None, :, :] == 3, a3, tl.where(i1[None, :, :] == 2, a2, a1))
            prod = v0[None, :, :].to(tl.float32) * s0 + v1[None, :, :].to(tl.float32) * s1
            acc += tl.sum(prod, axis=2)

    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        y = y_ptr + pid_k * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y, acc, mask=out_mask)


@triton.jit
def _sparse24_reduce_kernel(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


#: True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module loaded).
_INTERPRETED = not isinstance(_sparse24_linear_kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------- configs


@functools.cache
def _num_sms_cached(kind: str, index: int | None) -> int:
    if kind == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 4


def _num_sms(device: torch.device) -> int:
    return _num_sms_cached(device.type, device.index)


def heuristic_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """Block sizes / split-K chosen from the shape (no benchmarking); returns a new dict."""
    return dict(_heuristic(m, n, k, device.type, device.index))


@functools.lru_cache(maxsize=4096)
def _heuristic(m: int, n: int, k: int, kind: str, index: int | None) -> tuple:
    device = torch.device(kind, index) if index is not None else torch.device(kind)
    if m <= 2:
        bn = 32 if n >= 4096 else 16
        cfg = dict(USE_DOT=False, BLOCK_M=1 if m == 1 else 2, BLOCK_N=bn, BLOCK_G=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(USE_DOT=True, BLOCK_M=16, BLOCK_N=64, BLOCK_G=32, num_warps=4, num_stages=3)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"])
    groups = k // 4
    split = 1
    # Enough programs to fill the GPU twice over, each still looping over >= 2 blocks of groups.
    while tiles * split < 2 * _num_sms(device) and groups // (split * 2) >= 2 * cfg["BLOCK_G"]:
        split *= 2
    cfg["SPLIT_K"] = split
    return tuple(cfg.items())


def _candidates(m: int) -> list[dict]:
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
    for cfg in _candidates(m):
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
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    groups = k // 4
    split = cfg["SPLIT_K"]
    g_per_split = triton.cdiv(triton.cdiv(groups, split), cfg["BLOCK_G"]) * cfg["BLOCK_G"]
    split = max(1, triton.cdiv(groups, g_per_split))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    _sparse24_linear_kernel[grid](
        x, values, meta, bias if has_bias else values, target,
        m, n, k, g_per_split,
        x.stride(0), values.stride(0), meta.stride(0),
        target.stride(0) if split > 1 else 0, target.stride(-2),
        HAS_BIAS=has_bias and split == 1, SPLIT_K=split, USE_DOT=cfg["USE_DOT"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], DOT_FP32=_INTERPRETED,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if split > 1:
        block = 1024
        _sparse24_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias if has_bias else values, out, m * n, n, SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block
        )
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
