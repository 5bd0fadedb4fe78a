"""Decode attention over a dense KV cache that visits only selected KV blocks (learned-gate sparsity).

Shapes: ``q [b, Hq, d]`` (one query token per sequence), ``k, v [b, Hkv, L, d]`` (a dense cache, e.g.
transformers' ``DynamicCache`` tensors; last dim contiguous), blocks of ``block_size`` tokens selected **per
KV head** (shared by the ``G = Hq / Hkv`` query heads of its GQA group), given as a bool mask
``[b, Hkv, ceil(L / block_size)]`` or as sorted int block indices ``[b, Hkv, n]`` padded with ``-1``.

Kernel (flash-decoding): program ``(b * Hkv + h, split)`` loads the group's ``G`` queries once (padded to
``G_PAD >= 16`` rows for ``tl.dot``), takes its share (``ceil(count / NUM_SPLITS)`` blocks) of the head's
selected-block list, and for each block loads ``K, V [block_size, d]`` and runs an online softmax with fp32
scores and accumulator. Partial ``(max, sum, acc)`` per split go to fp32 scratch; ``_gated_combine_kernel``
merges the splits per query head and casts. The block count per head is read on the device, so no host
sync is needed. A head with no selected block outputs zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, m_ptr, l_ptr, acc_ptr,
    L, G, HKV, qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    if DOT_FP32:  # Triton's CPU interpreter mis-multiplies bf16 in tl.dot; exact in fp32 there
        q = q.to(tl.float32)
    cnt = tl.load(cnt_ptr + pid_bh)
    per = (cnt + NUM_SPLITS - 1) // NUM_SPLITS
    start = pid_s * per
    stop = tl.minimum(start + per, cnt)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_D], tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for i in range(start, stop):
        blk = tl.load(idx_ptr + b * stride_ib + h * stride_ih + i)
        n = blk * BLOCK_N + offs_n
        n_ok = n < L
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (pid_bh * NUM_SPLITS + pid_s) * G_PAD + offs_g
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part[:, None] * HEAD_D + offs_d[None, :], acc)


@triton.jit
def _gated_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, G, HKV, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, G_PAD: tl.constexpr, HEAD_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hq + query head
    hq_all = HKV * G
    b = pid // hq_all
    hq = pid % hq_all
    h = hq // G
    g = hq % G
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_D)
    s_ok = offs_s < NUM_SPLITS
    part = ((b * HKV + h) * NUM_SPLITS + offs_s) * G_PAD + g
    m = tl.load(m_ptr + part, mask=s_ok, other=float("-inf"))
    lsum = tl.load(l_ptr + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * lsum, 0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


#: True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module loaded).
_INTERPRETED = not isinstance(_gated_attention_kernel, triton.runtime.JITFunction)


def block_indices(blocks: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask ``[b, Hkv, nb]`` or ``-1``-padded indices ``[b, Hkv, n]`` -> (sorted int32 indices, int32 counts)."""
    if blocks.dtype == torch.bool:
        if blocks.shape[-1] != n_blocks:
            raise ValueError(f"block mask has {blocks.shape[-1]} blocks, the cache has {n_blocks}")
        ar = torch.arange(n_blocks, device=blocks.device, dtype=torch.int32)
        idx = torch.where(blocks, ar, n_blocks).sort(-1).values
        return idx.to(torch.int32).contiguous(), blocks.sum(-1, dtype=torch.int32).contiguous()
    if blocks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"blocks must be a bool mask or int indices, got {blocks.dtype}")
    ok = blocks >= 0
    if not blocks.is_cuda and bool((blocks >= n_blocks).any()):  # on CUDA: no host sync, indices are trusted
        raise ValueError(f"block index out of range (cache has {n_blocks} blocks)")
    idx = torch.where(ok, blocks, n_blocks).sort(-1).values.to(torch.int32)
    return idx.contiguous(), ok.sum(-1, dtype=torch.int32).contiguous()


def _check(q, k, v, block_size):
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError("expected q [b, Hq, d] and k, v [b, Hkv, L, d]")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share dtype float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must be contiguous in the head dimension")


def default_splits(batch_heads: int, n_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (2 per SM), at most one split per 2 blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, batch_heads), triton.cdiv(n_blocks, 2), 64))


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    *,
    counts: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention visiting only the selected KV blocks; returns ``[b, Hq, d]`` in ``q``'s dtype.

    ``blocks``: bool mask ``[b, Hkv, nb]`` or ``-1``-padded int indices ``[b, Hkv, n]`` (sorted on the way in);
    with ``counts [b, Hkv]`` given, ``blocks`` are int indices whose first ``counts`` entries are used as they
    are (any order, e.g. straight from ``topk``: no sort, no host sync). ``out``: optional ``[b, Hq, d]``.
    """
    _check(q, k, v, block_size)
    b, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    nb = triton.cdiv(length, block_size)
    if blocks.dim() != 3 or tuple(blocks.shape[:2]) != (b, hkv):
        raise ValueError(f"blocks must be [b, Hkv, n] = [{b}, {hkv}, n], got {tuple(blocks.shape)}")
    if counts is None:
        idx, cnt = block_indices(blocks.to(q.device), nb)
    else:
        if blocks.dtype not in (torch.int32, torch.int64) or counts.shape != blocks.shape[:2]:
            raise ValueError("with counts, blocks must be int indices [b, Hkv, n] and counts [b, Hkv]")
        idx, cnt = blocks, counts.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, contiguous in the head dimension")
    splits = num_splits or default_splits(b * hkv, nb, q.device)
    g_pad = max(16, triton.next_power_of_2(g))
    scratch = torch.empty(b * hkv * splits * g_pad * (d + 2), device=q.device, dtype=torch.float32)
    m, l_, acc = scratch.split([b * hkv * splits * g_pad] * 2 + [b * hkv * splits * g_pad * d])
    scale = d**-0.5 if scale is None else scale
    _gated_attention_kernel[(b * hkv, splits)](
        q, k, v, idx, cnt, m, l_, acc, length, g, hkv, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1),
        NUM_SPLITS=splits, G_PAD=g_pad, BLOCK_N=block_size, HEAD_D=d,
        DOT_FP32=_INTERPRETED, num_warps=4, num_stages=2,
    )
    _gated_combine_kernel[(b * hq,)](
        m, l_, acc, out, g, hkv, out.stride(0), out.stride(1),
        NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), G_PAD=g_pad, HEAD_D=d, num_warps=4,
    )
    return out


def gated_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Plain-torch reference (fp32 math) of :func:`gated_attention`."""
    b, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    nb = -(-length // block_size)
    if blocks.dtype == torch.bool:
        mask = blocks
    else:
        mask = torch.zeros(b, hkv, nb + 1, dtype=torch.bool, device=blocks.device)
        mask.scatter_(-1, torch.where(blocks >= 0, blocks, nb).long(), True)
        mask = mask[..., :nb]
    tok = mask.repeat_interleave(block_size, -1)[..., :length].repeat_interleave(hq // hkv, 1)  # [b, Hq, L]
    kf = k.float().repeat_interleave(hq // hkv, 1)
    vf = v.float().repeat_interleave(hq // hkv, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.float(), kf) * (d**-0.5 if scale is None else scale)
    p = s.masked_fill(~tok, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", p, vf).to(q.dtype)
