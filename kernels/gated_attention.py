"""Decode attention over a dense KV cache that visits only selected KV blocks (learned-gate sparsity).

Shapes: ``q [b, Hq, d]`` (one query token per sequence), ``k, v [b, Hkv, L, d]`` (a dense cache, e.g.
transformers' ``DynamicCache`` tensors; last dim contiguous), blocks of ``block_size`` tokens selected **per
KV head** (shared by the ``G = Hq / Hkv`` query heads of its GQA group), given as a bool mask
``[b, Hkv, ceil(L / block_size)]`` or as sorted int block indices ``[b, Hkv, n]`` padded with ``-1``.

Kernel (flash-decoding, one launch): program ``(b * Hkv + h, split)`` loads the group's ``G`` queries once (padded
to ``G_PAD >= 16`` rows for ``tl.dot``), takes an even share (sizes differ by at most one) of the head's
selected-block list, and for each block loads ``K, V [block_size, d]`` (pipelined, 16-byte ``cp.async``) and runs
an online softmax with fp32 scores and accumulator. With several splits, each stores its ``G`` real rows of
``(max, sum, acc)`` to fp32 scratch and bumps the head's arrival counter; the last split to arrive merges them
and writes the output. The block count per head is read on the device, so no host sync is needed. A head with no
selected block outputs zeros; ``-1`` / out-of-range indices select nothing. Batch offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._combine import merge_partial_row
from ._device import arrival_counters, check_shared, device_info, smem_limit
from ._online_softmax import accumulate as _accumulate
from ._online_softmax import scores as _scores


@triton.jit
def _gated_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, ws_ptr, arrive_ptr, out_ptr,
    L, G, HKV, N_BLOCKS, N_IDX, qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)  # int64: (B - 1) * stride_kb passes 2**31 on long caches
    h = (pid_bh % HKV).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    if DOT_FP32:  # Triton's CPU interpreter mis-multiplies bf16 in tl.dot; exact in fp32 there
        q = q.to(tl.float32)
    cnt = tl.minimum(tl.load(cnt_ptr + pid_bh), N_IDX)
    # Even shares (sizes differ by at most one block): no split is empty while cnt >= NUM_SPLITS.
    start = pid_s * cnt // NUM_SPLITS
    stop = (pid_s + 1) * cnt // NUM_SPLITS
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_D], tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    idx_row = idx_ptr + b * stride_ib + h * stride_ih
    for i in tl.range(start, stop, num_stages=NUM_STAGES):
        blk = tl.load(idx_row + i)
        # A padded (-1) or out-of-range index selects nothing (and is never dereferenced).
        sel = (blk >= 0) & (blk < N_BLOCKS)
        n = tl.where(sel, blk, 0) * BLOCK_N + offs_n
        n_ok = n < tl.where(sel, L, 0)
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        # log2-domain scores; masked, so a row that saw nothing yet stays finite (no -inf - -inf)
        p, alpha, m_i, l_i = _scores(q, k, n_ok[None, :], m_i, l_i, qk_scale, True, DOT_FP32, False)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = _accumulate(acc, p, alpha, v, DOT_FP32, False)

    out = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        # Combine in the same launch: each split stores its G real rows of (m, l, acc) and bumps the head's
        # arrival counter; the last split to arrive merges all splits row by row (log-sum-exp), writes the
        # output and resets the counter for the next call.
        PART: tl.constexpr = G_PAD * (HEAD_D + 2)
        base = ws_ptr + pid_bh.to(tl.int64) * NUM_SPLITS * PART
        mine = base + pid_s * PART
        tl.store(mine + offs_g, m_i, mask=g_ok)
        tl.store(mine + G_PAD + offs_g, l_i, mask=g_ok)
        tl.store(mine + 2 * G_PAD + offs_g[:, None] * HEAD_D + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.debug_barrier()
        arrived = tl.atomic_add(arrive_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            offs_s = tl.arange(0, SPLITS_PAD)
            s_ok = offs_s < NUM_SPLITS
            parts = base + offs_s * PART
            for g in range(0, G):
                num, den = merge_partial_row(parts, s_ok, g, G_PAD, HEAD_D, offs_d)
                o = num / tl.where(den > 0, den, 1.0)
                tl.store(out_ptr + b * stride_ob + (h * G + g) * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(arrive_ptr + pid_bh, 0, sem="relaxed", scope="gpu")


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


def default_splits(batch_heads: int, n_blocks: int, device: torch.device | None = None, *,
                   num_sms: int | None = None) -> int:
    """Enough programs to fill the GPU (2 per SM), at most one split per 2 of the ``n_blocks`` visited blocks."""
    if num_sms is None:
        num_sms = device_info(device if device is not None else torch.device("cpu"))[0]
    return max(1, min(triton.cdiv(2 * num_sms, batch_heads), triton.cdiv(n_blocks, 2), MAX_SPLITS))


#: Most split programs per KV head (the in-kernel combine holds ``[next_pow2(splits), head_dim]`` per row).
MAX_SPLITS = 64


def gated_config(batch_heads: int, n_visit: int, group: int, head_dim: int, block_size: int, *,
                 num_sms: int, num_splits: int | None = None, itemsize: int = 2, arch: int = 90) -> dict:
    """The launcher's config (pure): splits over at most ``n_visit`` selected blocks per head, warps, and the
    deepest pipeline (3 stages, else 2) whose shared memory ``arch`` grants."""
    splits = num_splits or default_splits(batch_heads, n_visit, num_sms=num_sms)
    cfg = dict(NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
               G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_size, HEAD_D=head_dim,
               num_warps=4, num_stages=3)
    if shared_bytes(cfg, itemsize) > smem_limit(arch):
        cfg["num_stages"] = 2
    return cfg


def shared_bytes(cfg: dict, itemsize: int) -> int:
    """Shared memory of a config (an upper bound of the compiled kernels): ``num_stages - 1`` buffered K and V
    tiles plus the ``[G_PAD, max(block, d)]`` fp32 layout-conversion scratch."""
    tile = cfg["BLOCK_N"] * cfg["HEAD_D"] * itemsize
    return max(1, cfg["num_stages"] - 1) * 2 * tile + cfg["G_PAD"] * max(cfg["BLOCK_N"], cfg["HEAD_D"]) * 4


def check_config(cfg: dict, itemsize: int, arch: int) -> None:
    """Raise ``ValueError`` for a split count the kernel cannot take or shared memory ``arch`` cannot grant."""
    if not 1 <= cfg["NUM_SPLITS"] <= MAX_SPLITS:
        raise ValueError(f"gated_attention: num_splits must be in [1, {MAX_SPLITS}], got {cfg['NUM_SPLITS']}")
    check_shared("gated_attention", shared_bytes(cfg, itemsize), arch,
                 f"use a smaller block_size (got {cfg['BLOCK_N']}) for head_dim {cfg['HEAD_D']}")


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
    are (any order, e.g. straight from ``topk``: no sort, no host sync; ``-1`` or out-of-range entries among them
    select nothing). ``out``: optional ``[b, Hq, d]``. One launch (the split combine runs in the kernel).
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
    if idx.shape[-1] > 1 and idx.stride(-1) != 1:
        idx = idx.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, contiguous in the head dimension")
    if max(k.stride(2), v.stride(2)) * length >= 2**31:
        raise ValueError(f"one head's cache ({length} tokens) spans >= 2**31 elements; the kernel indexes it in int32")
    sms, arch = device_info(q.device)
    n_visit = min(nb, idx.shape[-1]) if blocks.dtype != torch.bool else nb
    cfg = gated_config(b * hkv, n_visit, g, d, block_size, num_sms=sms, num_splits=num_splits,
                       itemsize=q.element_size(), arch=arch)
    check_config(cfg, q.element_size(), arch)
    splits = cfg["NUM_SPLITS"]
    if splits > 1:
        ws = torch.empty(b * hkv * splits * cfg["G_PAD"] * (d + 2), device=q.device, dtype=torch.float32)
        arrive = arrival_counters(q.device, b * hkv)
    else:
        ws = arrive = out
    scale = d**-0.5 if scale is None else scale
    _gated_attention_kernel[(b * hkv, splits)](
        q, k, v, idx, cnt, ws, arrive, out, length, g, hkv, nb, idx.shape[-1], scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
        NUM_SPLITS=splits, SPLITS_PAD=cfg["SPLITS_PAD"], G_PAD=cfg["G_PAD"], BLOCK_N=block_size, HEAD_D=d,
        NUM_STAGES=cfg["num_stages"], DOT_FP32=_INTERPRETED, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
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
