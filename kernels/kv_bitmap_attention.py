"""Decode attention over a bitmap-compressed KV cache (Mustafar-style), with split-K over the sequence.

Inputs (layout documented in :mod:`llmprune.formats.bitmap`): per (batch, KV head) row, the first ``n_compressed`` tokens
of K and of V as ``bitmap`` (int64, one word per 64-element tile, ``head_dim / 64`` tiles per token), ``offsets``
(int32, index of each tile's first kept value) and ``values`` (kept values, element order); then a dense window
``[B, Hkv, W, d]`` of the most recent tokens. The ``M`` queries ``q [B, Hq, M, d]`` are the last ``M`` window tokens
(causal among themselves); ``Hq = G * Hkv`` (GQA; ``G = 1`` is MHA, ``Hkv = 1`` MQA).

Kernel: grid ``(B * Hkv, S + 1)``. A program owns one KV head and all its ``G * M`` query rows (so each K/V tile is
decoded once per group), padded to ``BLOCK_R >= 16`` rows for ``tl.dot``. Programs ``0..S-1`` each take a contiguous
range of ``BLOCK_N``-token blocks of the compressed part; program ``S`` takes the dense window. Per block it loads the
bitmap words and offsets ``[BLOCK_N, d / 64]``, expands the bits to ``[BLOCK_N, d]``, ranks each kept element in its
tile with an exclusive prefix sum of the bits, gathers ``values[offset + rank]`` (zero where the bit is clear), and
runs an online softmax (``exp2``, fp32 state) with ``S = q K^T`` and ``acc += P V`` on tensor cores, fp32 accumulate.
Each program writes its unnormalised partial ``(m, l, acc)``; ``_kv_bitmap_combine_kernel`` merges the ``S + 1``
partials of every row (log-sum-exp rescaling) and writes the output in the query dtype.

``kv_bitmap_attention_ref`` is the plain-torch reference (unpack, concatenate the window, softmax in fp32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmprune.formats.bitmap import TILE, BitmapTensor, unpack_bitmap

_LOG2E = 1.4426950408889634

#: Most query tokens per sequence the kernel takes (``G * M`` rows per program must fit a register tile).
MAX_QUERIES = 16
# The jitted code below hard-codes the tile as 64 bits (one int64 bitmap word).
assert TILE == 64


@triton.jit
def _decode_bitmap_block(bm_ptr, off_ptr, val_ptr, offs_n, n_ok, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense ``[BLOCK_N, D]`` block of tokens ``offs_n`` from one row's bitmap/offsets/values (zeros if pruned)."""
    TPT: tl.constexpr = D // 64
    tiles = offs_n[:, None] * TPT + tl.arange(0, TPT)[None, :]  # [BLOCK_N, TPT]
    words = tl.load(bm_ptr + tiles, mask=n_ok[:, None], other=0)
    starts = tl.load(off_ptr + tiles, mask=n_ok[:, None], other=0)
    bitpos = tl.arange(0, 64).to(tl.int64)
    bits = ((words[:, :, None] >> bitpos[None, None, :]) & 1).to(tl.int32)  # [BLOCK_N, TPT, 64]
    rank = tl.cumsum(bits, axis=2) - bits
    idx = starts[:, :, None] + rank
    vals = tl.load(val_ptr + idx, mask=(bits != 0) & n_ok[:, None, None], other=0.0)
    return tl.reshape(vals, (BLOCK_N, D))


@triton.jit
def _kv_bitmap_attention_kernel(
    q_ptr, kb_ptr, ko_ptr, kv_ptr, vb_ptr, vo_ptr, vv_ptr, kw_ptr, vw_ptr, mask_ptr, po_ptr, pml_ptr,
    qk_scale,  # softmax scale * log2(e)
    HKV, G, M, T_C, W, NUM_SPLITS, BLOCKS_PER_SPLIT,
    s_qb, s_qh, s_qm,
    s_kbb, s_kbh, s_kob, s_koh, s_kvb, s_kvh,
    s_vbb, s_vbh, s_vob, s_voh, s_vvb, s_vvh,
    s_kwb, s_kwh, s_kwt, s_vwb, s_vwh, s_vwt,
    s_mb,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
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
            k = _decode_bitmap_block(kb, ko, kv, offs_n, n_ok, D, BLOCK_N)
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
            v = _decode_bitmap_block(vb, vo, vv, offs_n, n_ok, D, BLOCK_N)
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

    # partials: po [B*HKV, NUM_SPLITS + 1, BLOCK_R, D], pml [B*HKV, NUM_SPLITS + 1, 2, BLOCK_R]
    part = pid_bh.to(tl.int64) * (NUM_SPLITS + 1) + pid_s
    tl.store(po_ptr + part * BLOCK_R * D + rows[:, None] * D + offs_d[None, :], acc)
    tl.store(pml_ptr + part * 2 * BLOCK_R + rows, m_i)
    tl.store(pml_ptr + part * 2 * BLOCK_R + BLOCK_R + rows, l_i)


@triton.jit
def _kv_bitmap_combine_kernel(
    po_ptr, pml_ptr, out_ptr, HKV, G, M, NUM_PARTS,
    s_ob, s_oh, s_om,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    parts = tl.arange(0, BLOCK_P)
    p_ok = parts < NUM_PARTS
    base = pid_bh.to(tl.int64) * NUM_PARTS + parts
    m = tl.load(pml_ptr + base * 2 * BLOCK_R + r, mask=p_ok, other=float("-inf"))
    lsum = tl.load(pml_ptr + base * 2 * BLOCK_R + BLOCK_R + r, mask=p_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)
    denom = tl.sum(w * lsum, axis=0)
    offs_d = tl.arange(0, D)
    acc = tl.load(po_ptr + (base[:, None] * BLOCK_R + r) * D + offs_d[None, :], mask=p_ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / denom
    qhead = h * G + r // M
    qpos = r % M
    tl.store(out_ptr + b.to(tl.int64) * s_ob + qhead.to(tl.int64) * s_oh + qpos * s_om + offs_d, o.to(out_ptr.dtype.element_ty))


#: True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module loaded).
_INTERPRETED = not isinstance(_kv_bitmap_attention_kernel, triton.runtime.JITFunction)


def _num_splits(n_blocks: int, programs: int, device: torch.device) -> int:
    if n_blocks == 0:
        return 1
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = 2 * sms
    else:
        target = 4
    return max(1, min(n_blocks, math.ceil(target / max(1, programs))))


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
    block_n: int = 64,
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

    n_blocks = triton.cdiv(n_compressed, block_n)
    S = num_splits if num_splits is not None else _num_splits(n_blocks, B * Hkv, dev)
    S = max(1, min(S, max(1, n_blocks)))
    blocks_per_split = triton.cdiv(max(n_blocks, 1), S)
    S = triton.cdiv(max(n_blocks, 1), blocks_per_split)
    BLOCK_R = max(16, triton.next_power_of_2(G * M))
    po = torch.empty(B * Hkv, S + 1, BLOCK_R, d, dtype=torch.float32, device=dev)
    pml = torch.empty(B * Hkv, S + 1, 2, BLOCK_R, dtype=torch.float32, device=dev)
    mask_arg = kv_mask if kv_mask is not None else q
    s_mb = kv_mask.stride(0) if kv_mask is not None else 0
    ieee = q.dtype == torch.float32 and not _INTERPRETED
    num_warps = 4 if d <= 64 else 8
    _kv_bitmap_attention_kernel[(B * Hkv, S + 1)](
        q, k_bitmap, k_offsets, k_values, v_bitmap, v_offsets, v_values, k_window, v_window, mask_arg, po, pml,
        scale * _LOG2E,
        Hkv, G, M, n_compressed, W, S, blocks_per_split,
        q.stride(0), q.stride(1), q.stride(2),
        k_bitmap.stride(0), k_bitmap.stride(1), k_offsets.stride(0), k_offsets.stride(1),
        k_values.stride(0), k_values.stride(1),
        v_bitmap.stride(0), v_bitmap.stride(1), v_offsets.stride(0), v_offsets.stride(1),
        v_values.stride(0), v_values.stride(1),
        k_window.stride(0), k_window.stride(1), k_window.stride(2),
        v_window.stride(0), v_window.stride(1), v_window.stride(2),
        s_mb,
        D=d, BLOCK_N=block_n, BLOCK_R=BLOCK_R, HAS_MASK=kv_mask is not None,
        DOT_FP32=_INTERPRETED or q.dtype == torch.float32, IEEE=ieee,
        num_warps=num_warps,
    )
    _kv_bitmap_combine_kernel[(B * Hkv, G * M)](
        po, pml, out, Hkv, G, M, S + 1,
        out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_R=BLOCK_R, BLOCK_P=triton.next_power_of_2(S + 1),
    )
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
        bt = BitmapTensor(bm[..., :nt], off[..., :nt], vals, n_compressed * d)
        return unpack_bitmap(bt).view(B, Hkv, n_compressed, d)

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
