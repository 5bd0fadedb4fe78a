"""Decode attention over a bitmap-compressed KV cache (Mustafar-style), with split-K over the sequence.

Inputs (layout documented in :mod:`llmprune.formats.bitmap`): per (batch, KV head) row, the first ``n_compressed`` tokens
of K and of V as ``bitmap`` (int64, one word per 64-element tile, ``head_dim / 64`` tiles per token) and ``values``
(kept values, element order), plus, for format version 1 only, ``offsets`` (int32, index of each tile's first kept
value); then a dense window ``[B, Hkv, W, d]`` of the most recent tokens. The ``M`` queries ``q [B, Hq, M, d]`` are
the last ``M`` window tokens (causal among themselves); ``Hq = G * Hkv`` (GQA; ``G = 1`` is MHA, ``Hkv = 1`` MQA).

Kernel (one launch per call): grid ``(B * Hkv, S + 1)``. A program owns one KV head and all its ``G * M`` query
rows (so each K/V tile is decoded once per group), padded to ``BLOCK_R >= 16`` rows for ``tl.dot``. Programs
``0..S-1`` each take a contiguous range of ``BLOCK_N``-token blocks of the compressed part; program ``S`` takes the
dense window. Format version 2 (every token keeps exactly ``k`` values, offsets not stored): the values of a block
are one contiguous run, loaded as 16-byte vectors (``cp.async``, software-pipelined by ``tl.range(num_stages)``
so the next block's bitmap words and values are in flight while this one is decoded); each token's halves start at
``t * k`` plus the popcounts of its earlier 32-bit halves, each kept element's rank is one ``POPC`` of the half
shifted so the element's bit is the sign (no prefix sum across lanes), and the dense block is gathered from the
register tile (``tl.gather``). Whole blocks run unmasked; the row's last partial block runs once, masked. Version 1
(stored offsets: per-head keep counts sharing one values buffer) gathers each value from global memory at
``offsets[tile] + rank``. Then an online softmax (``exp2``, fp32 state) with ``S = q K^T`` and ``acc += P V`` on
tensor cores, fp32 accumulate. Each program stores the ``G * M`` real rows of its unnormalised partial
``(m, l, acc)`` and bumps the head's arrival counter; the last of the ``S + 1`` to arrive merges them (log-sum-exp
rescaling), writes the output in the query dtype and resets the counter.

16-bit values of whole blocks expand two elements at a time (``PAIRS``, when every row starts 4-byte aligned,
which the cache's buffers guarantee): the block's value run becomes sliding 32-bit words ``src[j - 1] | src[j] <<
16``, so each element pair is one popcount, one 32-bit shared-memory gather, one ``PRMT`` (sign-replicated bitmap
bits as the pair's mask) and one ``AND``; 778 SASS per 64-token iteration on sm_90 (1253 one element at a time).

Known limit: the compile-level report (``eval/results/kernel_report.md``) puts the main loop's issue ceiling at
~4.0 TB/s of compressed bytes on sm_90 (2.5 one element at a time, 1.2 before format 2), just above the ~3.8 TB/s
that 2.2x dense SDPA needs on an H200 and short of the 1.5x margin; 229 registers leave 2 CTAs per SM.
:func:`kv_bitmap_config` is the launcher's config as a pure function; :func:`check_config` refuses block sizes and
shared memory the GPU cannot take.

``kv_bitmap_attention_ref`` is the plain-torch reference (unpack, concatenate the window, softmax in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmprune.formats.bitmap import TILE, token_offsets, unpack_by_offsets

from ._combine import merge_partial_row
from ._device import arrival_counters, device_info
from ._kv_bitmap_args import check_row as _check_row
from ._kv_bitmap_args import pairs as _pairs
from ._kv_bitmap_args import row_keep as _row_keep
from ._kv_bitmap_config import BLOCK_N_RANGE, MAX_SPLITS, check_config, kv_bitmap_config, shared_bytes  # noqa: F401
from ._kv_bitmap_decode import decode_block
from ._online_softmax import accumulate as _accumulate
from ._online_softmax import scores as _scores

_LOG2E = 1.4426950408889634

#: Most query tokens per sequence the kernel takes (``G * M`` rows per program must fit a register tile).
MAX_QUERIES = 16
# The jitted code below hard-codes the tile as 64 bits (one int64 bitmap word).
assert TILE == 64


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
    K_KEEP: tl.constexpr, V_KEEP: tl.constexpr, K_CHUNK: tl.constexpr, V_CHUNK: tl.constexpr,
    NUM_STAGES: tl.constexpr, K_PAIRS: tl.constexpr, V_PAIRS: tl.constexpr,
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
        n_full = (n_end - n_start) // BLOCK_N
        # Main loop over whole blocks: no token mask, so the value runs load as 16-byte vectors; software-pipelined
        # (the next block's bitmap words and values are in flight while this one is expanded).
        for it in tl.range(0, n_full, num_stages=NUM_STAGES):
            n0 = n_start + it * BLOCK_N
            k = decode_block(kb, ko, kv, n0, n_end, K_KEEP, K_CHUNK, D, BLOCK_N, False, HW_POPC, K_PAIRS)
            if HAS_MASK:
                s_ok = (tl.load(mask_ptr + b64 * s_mb + n0 + tl.arange(0, BLOCK_N)) != 0)[None, :]
                p, alpha, m_i, l_i = _scores(q, k, s_ok, m_i, l_i, qk_scale, True, DOT_FP32, IEEE)
            else:
                p, alpha, m_i, l_i = _scores(q, k, True, m_i, l_i, qk_scale, False, DOT_FP32, IEEE)
            v = decode_block(vb, vo, vv, n0, n_end, V_KEEP, V_CHUNK, D, BLOCK_N, False, HW_POPC, V_PAIRS)
            acc = _accumulate(acc, p, alpha, v, DOT_FP32, IEEE)
        n0 = n_start + n_full * BLOCK_N
        if n0 < n_end:  # the row's last, partial block (only the last split has one)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_end
            k = decode_block(kb, ko, kv, n0, n_end, K_KEEP, K_CHUNK, D, BLOCK_N, True, HW_POPC)
            s_ok = n_ok
            if HAS_MASK:
                s_ok = s_ok & (tl.load(mask_ptr + b64 * s_mb + offs_n, mask=n_ok, other=0) != 0)
            p, alpha, m_i, l_i = _scores(q, k, s_ok[None, :], m_i, l_i, qk_scale, True, DOT_FP32, IEEE)
            v = decode_block(vb, vo, vv, n0, n_end, V_KEEP, V_CHUNK, D, BLOCK_N, True, HW_POPC)
            acc = _accumulate(acc, p, alpha, v, DOT_FP32, IEEE)
    else:
        kw = kw_ptr + b64 * s_kwb + h64 * s_kwh
        vw = vw_ptr + b64 * s_vwb + h64 * s_vwh
        for t0 in range(0, W, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            t_ok = offs_t < W
            k = tl.load(kw + offs_t[:, None].to(tl.int64) * s_kwt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            # causal among the new tokens: query qpos sits at window index W - M + qpos
            s_ok = t_ok[None, :] & (offs_t[None, :] <= (W - M + qpos)[:, None])
            if HAS_MASK:
                mk = tl.load(mask_ptr + b64 * s_mb + T_C + offs_t, mask=t_ok, other=0) != 0
                s_ok = s_ok & mk[None, :]
            p, alpha, m_i, l_i = _scores(q, k, s_ok, m_i, l_i, qk_scale, True, DOT_FP32, IEEE)
            v = tl.load(vw + offs_t[:, None].to(tl.int64) * s_vwt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            acc = _accumulate(acc, p, alpha, v, DOT_FP32, IEEE)

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


def kv_bitmap_attention(
    q: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_offsets: torch.Tensor | None,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_offsets: torch.Tensor | None,
    v_values: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    n_compressed: int,
    *,
    scale: float | None = None,
    kv_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    k_keep: int | None = None,
    v_keep: int | None = None,
) -> torch.Tensor:
    """``softmax(q K^T * scale) V`` for the last ``M`` tokens over bitmap-compressed K/V plus a dense window.

    Args:
        q: ``[B, Hq, M, d]`` fp16/bf16/fp32, ``d`` in 64/128/256, ``M <= 16`` and ``M <= W``.
        k_bitmap, v_bitmap: ``[B, Hkv, >= n_compressed * d / 64]`` int64.
        k_offsets, v_offsets: same shape, int32 (format version 1), or None (version 2: every token keeps exactly
            ``k`` values, stored contiguously; ``k`` is ``k_keep`` / ``v_keep`` or ``values.shape[-1] /
            n_compressed``).
        k_values, v_values: ``[B, Hkv, nvals]`` in ``q.dtype``.
        k_window, v_window: ``[B, Hkv, W, d]`` (the queries are the last ``M`` of these tokens).
        n_compressed: tokens held in the bitmaps.
        scale: softmax scale (default ``d ** -0.5``).
        kv_mask: optional ``[B, n_compressed + W]`` (bool/int; nonzero = attend), e.g. left padding.
        out: optional ``[B, Hq, M, d]`` output in ``q.dtype`` (overwritten).
        num_splits: split-K programs over the compressed part (default: enough to fill the GPU).
        block_n: tokens per step (default: :func:`kv_bitmap_config`'s).
        k_keep, v_keep: values per token of a format-2 row (default: inferred as above).

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
    for name, t in (("k_offsets", k_offsets), ("v_offsets", v_offsets)):
        if t is not None:
            _check_row(name, t, B, Hkv, torch.int32, n_tiles, dev)
    _check_row("k_values", k_values, B, Hkv, q.dtype, 0, dev)
    _check_row("v_values", v_values, B, Hkv, q.dtype, 0, dev)
    kk = _row_keep("k", k_offsets, k_values, k_keep, n_compressed, d)
    vk = _row_keep("v", v_offsets, v_values, v_keep, n_compressed, d)
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
    cfg = kv_bitmap_config(B, Hkv, G, M, n_compressed, d, num_sms=sms, block_n=block_n, num_splits=num_splits,
                           k_keep=kk, v_keep=vk)
    check_config(cfg, q.element_size(), arch)
    S, BLOCK_R = cfg["NUM_SPLITS"], cfg["BLOCK_R"]
    ws = torch.empty(B * Hkv * (S + 1) * BLOCK_R * (d + 2), dtype=torch.float32, device=dev)
    arrive = arrival_counters(dev, B * Hkv)
    mask_arg = kv_mask if kv_mask is not None else q
    s_mb = kv_mask.stride(0) if kv_mask is not None else 0
    ieee = q.dtype == torch.float32 and not _INTERPRETED
    # format 2 rows have no offsets: the kernel never reads that pointer (K_KEEP / V_KEEP > 0)
    ko = k_offsets if k_offsets is not None else k_bitmap
    vo = v_offsets if v_offsets is not None else v_bitmap
    _kv_bitmap_attention_kernel[(B * Hkv, S + 1)](
        q, k_bitmap, ko, k_values, v_bitmap, vo, v_values, k_window, v_window, mask_arg, ws, arrive, out,
        scale * _LOG2E,
        Hkv, G, M, n_compressed, W, S, cfg["BLOCKS_PER_SPLIT"],
        q.stride(0), q.stride(1), q.stride(2),
        k_bitmap.stride(0), k_bitmap.stride(1), ko.stride(0), ko.stride(1),
        k_values.stride(0), k_values.stride(1),
        v_bitmap.stride(0), v_bitmap.stride(1), vo.stride(0), vo.stride(1),
        v_values.stride(0), v_values.stride(1),
        k_window.stride(0), k_window.stride(1), k_window.stride(2),
        v_window.stride(0), v_window.stride(1), v_window.stride(2),
        s_mb, out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=BLOCK_R, PARTS_PAD=cfg["PARTS_PAD"],
        K_KEEP=cfg["K_KEEP"], V_KEEP=cfg["V_KEEP"], K_CHUNK=cfg["K_CHUNK"], V_CHUNK=cfg["V_CHUNK"],
        NUM_STAGES=cfg["num_stages"], K_PAIRS=_pairs(k_values, kk), V_PAIRS=_pairs(v_values, vk), HAS_MASK=kv_mask is not None,
        DOT_FP32=_INTERPRETED or q.dtype == torch.float32, IEEE=ieee, HW_POPC=not _INTERPRETED,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def kv_bitmap_attention_ref(
    q: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_offsets: torch.Tensor | None,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_offsets: torch.Tensor | None,
    v_values: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    n_compressed: int,
    *,
    scale: float | None = None,
    kv_mask: torch.Tensor | None = None,
    k_keep: int | None = None,
    v_keep: int | None = None,
) -> torch.Tensor:
    """Plain-torch reference of :func:`kv_bitmap_attention` (fp32 math, output in ``q.dtype``)."""
    B, Hq, M, d = q.shape
    Hkv, W = k_window.shape[1], k_window.shape[2]
    nt = n_compressed * d // TILE

    def dense(bm, off, vals, keep):
        if n_compressed == 0:
            return vals.new_zeros(B, Hkv, 0, d)
        bm = bm[..., :nt]
        if off is None:  # format 2: the offsets the layout defines (token * keep + earlier tiles of the token)
            off = token_offsets(bm, keep or vals.shape[-1] // n_compressed, d)
        # Through the offsets, as the kernel reads them (rows may share one values buffer: per-head keep counts).
        return unpack_by_offsets(bm, off[..., :nt], vals, n_compressed * d).view(B, Hkv, n_compressed, d)

    k = torch.cat([dense(k_bitmap, k_offsets, k_values, k_keep), k_window], dim=2).float()
    v = torch.cat([dense(v_bitmap, v_offsets, v_values, v_keep), v_window], dim=2).float()
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
