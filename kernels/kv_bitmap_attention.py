"""Decode attention over a bitmap-compressed KV cache (Mustafar-style), with split-K over the sequence.

Inputs (layout documented in :mod:`llmprune.formats.bitmap`): per (batch, KV head) row, the first ``n_compressed`` tokens
of K and of V as ``bitmap`` (int64, one word per 64-element tile, ``head_dim / 64`` tiles per token), ``offsets``
(int32, index of each tile's first kept value) and ``values`` (kept values, element order); then a dense window
``[B, Hkv, W, d]`` of the most recent tokens. The ``M`` queries ``q [B, Hq, M, d]`` are the last ``M`` window tokens
(causal among themselves); ``Hq = G * Hkv`` (GQA; ``G = 1`` is MHA, ``Hkv = 1`` MQA).

Kernel (one launch per call): grid ``(B * Hkv, S + 1)``. A program owns one KV head and all its ``G * M`` query
rows (so each K/V tile is decoded once per group), padded to ``BLOCK_R >= 16`` rows for ``tl.dot``. Programs
``0..S-1`` each take a contiguous range of ``BLOCK_N``-token blocks of the compressed part; program ``S`` takes the
dense window. Per block it loads the bitmap words and offsets ``[BLOCK_N, d / 64]``, splits each word into two 32-bit
halves, ranks each kept element by ``popcount(half & (2**i - 1))`` (the ``POPC`` instruction; no prefix sum across
lanes), gathers ``values[offset + rank]`` (zero where the bit is clear), and runs an online softmax (``exp2``, fp32
state) with ``S = q K^T`` and ``acc += P V`` on tensor cores, fp32 accumulate. Each program stores the ``G * M`` real
rows of its unnormalised partial ``(m, l, acc)`` and bumps the head's arrival counter; the last of the ``S + 1`` to
arrive merges them (log-sum-exp rescaling), writes the output in the query dtype and resets the counter.

Known limit: the values are still gathered 2 bytes at a time behind dependent metadata loads,
with no ``cp.async`` pipelining; the compile-level report (``eval/results/kernel_report.md``) puts the main loop's
issue ceiling near 1.2 TB/s on sm_90, below what 2.2x dense SDPA needs. :func:`kv_bitmap_config` is the launcher's
config as a pure function; :func:`check_config` refuses block sizes and shared memory the GPU cannot take.

``kv_bitmap_attention_ref`` is the plain-torch reference (unpack, concatenate the window, softmax in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from llmprune.formats.bitmap import TILE, unpack_by_offsets

from ._combine import merge_partial_row
from ._device import arrival_counters, device_info
from ._kv_bitmap_config import BLOCK_N_RANGE, MAX_SPLITS, check_config, kv_bitmap_config, shared_bytes  # noqa: F401

_LOG2E = 1.4426950408889634

#: Most query tokens per sequence the kernel takes (``G * M`` rows per program must fit a register tile).
MAX_QUERIES = 16
# The jitted code below hard-codes the tile as 64 bits (one int64 bitmap word).
assert TILE == 64


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
def _decode_bitmap_block(bm_ptr, off_ptr, val_ptr, offs_n, n_ok, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         HW_POPC: tl.constexpr):
    """Dense ``[BLOCK_N, D]`` block of tokens ``offs_n`` from one row's bitmap/offsets/values (zeros if pruned).

    Each 64-bit tile word is taken as two 32-bit halves; the rank of kept element ``i`` of a half is
    ``popcount(half & (2**i - 1))`` (plus the low half's popcount for the high half): no prefix sum across lanes.
    """
    TPT: tl.constexpr = D // 64
    tiles = offs_n[:, None] * TPT + tl.arange(0, TPT)[None, :]  # [BLOCK_N, TPT]
    words = tl.load(bm_ptr + tiles, mask=n_ok[:, None], other=0)
    starts = tl.load(off_ptr + tiles, mask=n_ok[:, None], other=0)
    lo = words.to(tl.int32)
    hi = (words >> 32).to(tl.int32)
    halves = tl.join(lo, hi)  # [BLOCK_N, TPT, 2]
    first = tl.join(starts, starts + _popcount32(lo, HW_POPC))  # index of each half's first kept value
    bitpos = tl.arange(0, 32)
    below = (tl.full((32,), 1, tl.int32) << bitpos) - 1  # bits under position i (2**31 - 1 wraps right)
    h4 = halves[:, :, :, None]
    kept = ((h4 >> bitpos[None, None, None, :]) & 1) != 0  # [BLOCK_N, TPT, 2, 32]
    rank = _popcount32(h4 & below[None, None, None, :], HW_POPC)
    vals = tl.load(val_ptr + (first[:, :, :, None] + rank), mask=kept & n_ok[:, None, None, None], other=0.0)
    return tl.reshape(vals, (BLOCK_N, D))


@triton.jit
def _kv_bitmap_attention_kernel(
    q_ptr, kb_ptr, ko_ptr, kv_ptr, vb_ptr, vo_ptr, vv_ptr, kw_ptr, vw_ptr, mask_ptr, ws_ptr, arrive_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e)
    HKV, G, M, T_C, W, NUM_SPLITS, BLOCKS_PER_SPLIT,
    s_qb, s_qh, s_qm,
    s_kbb, s_kbh, s_kob, s_koh, s_kvb, s_kvh,
    s_vbb, s_vbh, s_vob, s_voh, s_vvb, s_vvh,
    s_kwb, s_kwh, s_kwt, s_vwb, s_vwh, s_vwt,
    s_mb, s_ob, s_oh, s_om,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PARTS_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, HW_POPC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < G * M
    qhead = h * G + rows // M
    qpos = rows % M  # query index among the M new tokens
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b64 * s_qb + qhead[:, None].to(tl.int64) * s_qh + qpos[:, None] * s_qm + offs_d[None, :],
                mask=r_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D), tl.float32)

    if pid_s < NUM_SPLITS:
        kb = kb_ptr + b64 * s_kbb + h64 * s_kbh
        ko = ko_ptr + b64 * s_kob + h64 * s_koh
        kv = kv_ptr + b64 * s_kvb + h64 * s_kvh
        vb = vb_ptr + b64 * s_vbb + h64 * s_vbh
        vo = vo_ptr + b64 * s_vob + h64 * s_voh
        vv = vv_ptr + b64 * s_vvb + h64 * s_vvh
        n_start = pid_s * BLOCKS_PER_SPLIT * BLOCK_N
        n_end = tl.minimum(n_start + BLOCKS_PER_SPLIT * BLOCK_N, T_C)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_end
            k = _decode_bitmap_block(kb, ko, kv, offs_n, n_ok, D, BLOCK_N, HW_POPC)
            if DOT_FP32:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            valid = n_ok
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b64 * s_mb + offs_n, mask=n_ok, other=0) != 0)
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _decode_bitmap_block(vb, vo, vv, offs_n, n_ok, D, BLOCK_N, HW_POPC)
            if DOT_FP32:
                v = v.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    else:
        kw = kw_ptr + b64 * s_kwb + h64 * s_kwh
        vw = vw_ptr + b64 * s_vwb + h64 * s_vwh
        for t0 in range(0, W, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            t_ok = offs_t < W
            k = tl.load(kw + offs_t[:, None].to(tl.int64) * s_kwt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            # causal among the new tokens: query qpos sits at window index W - M + qpos
            valid = t_ok[None, :] & (offs_t[None, :] <= (W - M + qpos)[:, None])
            if HAS_MASK:
                mk = tl.load(mask_ptr + b64 * s_mb + T_C + offs_t, mask=t_ok, other=0) != 0
                valid = valid & mk[None, :]
            s = tl.where(valid, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vw + offs_t[:, None].to(tl.int64) * s_vwt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            if DOT_FP32:
                v = v.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    # Combine in the same launch: each of the NUM_SPLITS + 1 programs of this KV head stores the G * M real rows of
    # its partial (m, l, acc) and bumps the head's arrival counter; the last to arrive merges them row by row
    # (log-sum-exp), writes the output and resets the counter for the next call.
    PART: tl.constexpr = BLOCK_R * (D + 2)
    n_parts = NUM_SPLITS + 1
    base = ws_ptr + pid_bh.to(tl.int64) * n_parts * PART
    mine = base + pid_s * PART
    tl.store(mine + rows, m_i, mask=r_ok)
    tl.store(mine + BLOCK_R + rows, l_i, mask=r_ok)
    tl.store(mine + 2 * BLOCK_R + rows[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None])
    tl.debug_barrier()
    arrived = tl.atomic_add(arrive_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
    if arrived == n_parts - 1:
        offs_p = tl.arange(0, PARTS_PAD)
        p_ok = offs_p < n_parts
        parts = base + offs_p * PART
        for r in range(0, G * M):
            num, den = merge_partial_row(parts, p_ok, r, BLOCK_R, D, offs_d)
            o = num / den
            o_ptr = out_ptr + b64 * s_ob + (h * G + r // M).to(tl.int64) * s_oh + (r % M) * s_om + offs_d
            tl.store(o_ptr, o.to(out_ptr.dtype.element_ty))
        tl.atomic_xchg(arrive_ptr + pid_bh, 0, sem="relaxed", scope="gpu")


#: True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module loaded).
_INTERPRETED = not isinstance(_kv_bitmap_attention_kernel, triton.runtime.JITFunction)


def _check_row(name: str, t: torch.Tensor, B: int, H: int, dtype, min_len: int, device) -> None:
    if t.dim() != 3 or t.shape[0] != B or t.shape[1] != H or t.shape[2] < min_len:
        raise ValueError(f"{name} must be [{B}, {H}, >={min_len}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if t.shape[2] > 1 and t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def kv_bitmap_attention(
    q: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_offsets: torch.Tensor,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_offsets: torch.Tensor,
    v_values: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    n_compressed: int,
    *,
    scale: float | None = None,
    kv_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """``softmax(q K^T * scale) V`` for the last ``M`` tokens over bitmap-compressed K/V plus a dense window.

    Args:
        q: ``[B, Hq, M, d]`` fp16/bf16/fp32, ``d`` in 64/128/256, ``M <= 16`` and ``M <= W``.
        k_bitmap, v_bitmap: ``[B, Hkv, >= n_compressed * d / 64]`` int64.
        k_offsets, v_offsets: same shape, int32.
        k_values, v_values: ``[B, Hkv, nvals]`` in ``q.dtype``.
        k_window, v_window: ``[B, Hkv, W, d]`` (the queries are the last ``M`` of these tokens).
        n_compressed: tokens held in the bitmaps.
        scale: softmax scale (default ``d ** -0.5``).
        kv_mask: optional ``[B, n_compressed + W]`` (bool/int; nonzero = attend), e.g. left padding.
        out: optional ``[B, Hq, M, d]`` output in ``q.dtype`` (overwritten).
        num_splits: split-K programs over the compressed part (default: enough to fill the GPU).

    Returns:
        ``[B, Hq, M, d]`` in ``q.dtype``.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, M, d], got {tuple(q.shape)}")
    B, Hq, M, d = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16/bf16/fp32, got {q.dtype}")
    if d not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256, got {d}")
    if k_window.dim() != 4 or k_window.shape[0] != B or k_window.shape[3] != d:
        raise ValueError(f"k_window must be [{B}, Hkv, W, {d}], got {tuple(k_window.shape)}")
    Hkv, W = k_window.shape[1], k_window.shape[2]
    if v_window.shape != k_window.shape:
        raise ValueError(f"v_window shape {tuple(v_window.shape)} != k_window shape {tuple(k_window.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    G = Hq // Hkv
    if not 1 <= M <= min(MAX_QUERIES, W):
        raise ValueError(f"need 1 <= M <= min({MAX_QUERIES}, window length {W}); got M={M}")
    if G * M > 128:
        raise ValueError(f"G * M = {G * M} query rows per KV head exceed 128")
    if n_compressed < 0:
        raise ValueError("n_compressed must be >= 0")
    dev = q.device
    for name, t in (("k_window", k_window), ("v_window", v_window)):
        if t.dtype != q.dtype or t.device != dev or t.stride(3) != 1:
            raise ValueError(f"{name} must be {q.dtype} on {dev} with a contiguous last dimension")
    n_tiles = n_compressed * d // TILE
    _check_row("k_bitmap", k_bitmap, B, Hkv, torch.int64, n_tiles, dev)
    _check_row("v_bitmap", v_bitmap, B, Hkv, torch.int64, n_tiles, dev)
    _check_row("k_offsets", k_offsets, B, Hkv, torch.int32, n_tiles, dev)
    _check_row("v_offsets", v_offsets, B, Hkv, torch.int32, n_tiles, dev)
    _check_row("k_values", k_values, B, Hkv, q.dtype, 0, dev)
    _check_row("v_values", v_values, B, Hkv, q.dtype, 0, dev)
    if kv_mask is not None:
        if kv_mask.dim() != 2 or kv_mask.shape[0] != B or kv_mask.shape[1] < n_compressed + W:
            raise ValueError(f"kv_mask must be [{B}, {n_compressed + W}], got {tuple(kv_mask.shape)}")
        if kv_mask.device != dev:
            raise ValueError("kv_mask must be on q's device")
        kv_mask = kv_mask[:, : n_compressed + W].to(torch.int8).contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != dev or out.stride(3) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {dev}, last dim contiguous")
    if q.stride(3) != 1:
        q = q.contiguous()
    scale = d**-0.5 if scale is None else float(scale)

    sms, arch = device_info(dev)
    cfg = kv_bitmap_config(B, Hkv, G, M, n_compressed, d, num_sms=sms, block_n=block_n, num_splits=num_splits)
    check_config(cfg, q.element_size(), arch)
    S, BLOCK_R = cfg["NUM_SPLITS"], cfg["BLOCK_R"]
    ws = torch.empty(B * Hkv * (S + 1) * BLOCK_R * (d + 2), dtype=torch.float32, device=dev)
    arrive = arrival_counters(dev, B * Hkv)
    mask_arg = kv_mask if kv_mask is not None else q
    s_mb = kv_mask.stride(0) if kv_mask is not None else 0
    ieee = q.dtype == torch.float32 and not _INTERPRETED
    _kv_bitmap_attention_kernel[(B * Hkv, S + 1)](
        q, k_bitmap, k_offsets, k_values, v_bitmap, v_offsets, v_values, k_window, v_window, mask_arg, ws, arrive, out,
        scale * _LOG2E,
        Hkv, G, M, n_compressed, W, S, cfg["BLOCKS_PER_SPLIT"],
        q.stride(0), q.stride(1), q.stride(2),
        k_bitmap.stride(0), k_bitmap.stride(1), k_offsets.stride(0), k_offsets.stride(1),
        k_values.stride(0), k_values.stride(1),
        v_bitmap.stride(0), v_bitmap.stride(1), v_offsets.stride(0), v_offsets.stride(1),
        v_values.stride(0), v_values.stride(1),
        k_window.stride(0), k_window.stride(1), k_window.stride(2),
        v_window.stride(0), v_window.stride(1), v_window.stride(2),
        s_mb, out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=BLOCK_R, PARTS_PAD=cfg["PARTS_PAD"], HAS_MASK=kv_mask is not None,
        DOT_FP32=_INTERPRETED or q.dtype == torch.float32, IEEE=ieee, HW_POPC=not _INTERPRETED,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def kv_bitmap_attention_ref(
    q: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_offsets: torch.Tensor,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_offsets: torch.Tensor,
    v_values: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    n_compressed: int,
    *,
    scale: float | None = None,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch reference of :func:`kv_bitmap_attention` (fp32 math, output in ``q.dtype``)."""
    B, Hq, M, d = q.shape
    Hkv, W = k_window.shape[1], k_window.shape[2]
    nt = n_compressed * d // TILE

    def dense(bm, off, vals):
        if n_compressed == 0:
            return vals.new_zeros(B, Hkv, 0, d)
        # Through the offsets, as the kernel reads them (rows may share one values buffer: per-head keep counts).
        return unpack_by_offsets(bm[..., :nt], off[..., :nt], vals, n_compressed * d).view(B, Hkv, n_compressed, d)

    k = torch.cat([dense(k_bitmap, k_offsets, k_values), k_window], dim=2).float()
    v = torch.cat([dense(v_bitmap, v_offsets, v_values), v_window], dim=2).float()
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    T = n_compressed + W
    scale = d**-0.5 if scale is None else scale
    s = torch.einsum("bhmd,bhtd->bhmt", q.float(), k) * scale
    pos_q = T - M + torch.arange(M, device=q.device)
    allowed = torch.arange(T, device=q.device)[None, :] <= pos_q[:, None]  # [M, T]
    allowed = allowed[None, None]
    if kv_mask is not None:
        allowed = allowed & (kv_mask[:, None, None, :T] != 0)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhmt,bhtd->bhmd", p, v).to(q.dtype)
