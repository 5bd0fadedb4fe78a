"""Triton decode attention over the bitmap KV cache against the torch reference (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch
from helpers import check_close
from llmprune.kernels.kv_bitmap_attention import _pairs, kv_bitmap_attention, kv_bitmap_attention_ref

from llmprune.formats.bitmap import keep_count, pack_topk, token_offsets
from llmprune.runtime.kvcache.store import _BitmapStore

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_cache(B, Hkv, T, d, dtype, window=8, ks=0.7, vs=0.5, seed=0):
    """A cache state of T tokens: the first T - W compressed, the last W (<= window) dense."""
    g = torch.Generator().manual_seed(seed)
    W = min(T, window)
    Tc = T - W
    k_st = _BitmapStore(B, Hkv, d, keep_count(d, ks), dtype, DEV)
    v_st = _BitmapStore(B, Hkv, d, keep_count(d, vs), dtype, DEV)
    if Tc:
        k_st.append(torch.randn(B, Hkv, Tc, d, generator=g).to(dtype).to(DEV))
        v_st.append(torch.randn(B, Hkv, Tc, d, generator=g).to(dtype).to(DEV))
    kw = torch.randn(B, Hkv, W, d, generator=g).to(dtype).to(DEV)
    vw = torch.randn(B, Hkv, W, d, generator=g).to(dtype).to(DEV)
    return (k_st.bitmap, k_st.offsets, k_st.values, v_st.bitmap, v_st.offsets, v_st.values, kw, vw, Tc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("T", [1, 63, 65, 200])
def test_kernel_matches_reference(T, d, gqa, dtype):
    B, Hkv = 2, 2
    cache = make_cache(B, Hkv, T, d, dtype, seed=T + d)
    q = torch.randn(B, Hkv * gqa, 1, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    out = torch.full_like(q, float("nan"))  # poisoned: every entry must be written
    y = kv_bitmap_attention(q, *cache, out=out, num_splits=2)
    assert y is out
    check_close(y, kv_bitmap_attention_ref(q, *cache))


@pytest.mark.parametrize("M,splits", [(2, 1), (3, 3)])
def test_several_queries_mask_and_split_k(M, splits):
    """A few new tokens (causal among themselves), left padding through kv_mask, uneven split-K ranges."""
    dtype, B, Hkv, gqa, d, T = torch.float16, 2, 1, 4, 64, 150
    cache = make_cache(B, Hkv, T, d, dtype, window=16, seed=3)
    q = torch.randn(B, Hkv * gqa, M, d).to(dtype).to(DEV)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    mask[1, :70] = False  # sequence 1 is left-padded past the first compressed blocks
    scale = 0.1
    y = kv_bitmap_attention(q, *cache, kv_mask=mask, scale=scale, num_splits=splits, block_n=32)
    check_close(y, kv_bitmap_attention_ref(q, *cache, kv_mask=mask, scale=scale))


def test_fp32_and_strided_views():
    # storage views of a larger capacity buffer (as in the cache) and fp32
    B, Hkv, d, dtype = 1, 2, 64, torch.float32
    k_st = _BitmapStore(B, Hkv, d, 20, dtype, DEV, capacity=256)
    v_st = _BitmapStore(B, Hkv, d, 20, dtype, DEV, capacity=256)
    k_st.append(torch.randn(B, Hkv, 96, d, device=DEV))
    v_st.append(torch.randn(B, Hkv, 96, d, device=DEV))
    assert k_st.bitmap.stride(1) > k_st.bitmap.shape[-1]  # really a strided view
    kw, vw = torch.randn(2, B, Hkv, 5, d, device=DEV)
    q = torch.randn(B, 4, 1, d, device=DEV)
    cache = (k_st.bitmap, k_st.offsets, k_st.values, v_st.bitmap, v_st.offsets, v_st.values, kw, vw, 96)
    check_close(kv_bitmap_attention(q, *cache), kv_bitmap_attention_ref(q, *cache))


def test_launcher_checks():
    dtype = torch.float16
    cache = list(make_cache(1, 2, 40, 64, dtype))
    q = torch.randn(1, 4, 1, 64).to(dtype).to(DEV)
    with pytest.raises(ValueError, match="head_dim"):
        kv_bitmap_attention(q[..., :32], *cache)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kv_bitmap_attention(q[:, :3], *cache)
    with pytest.raises(ValueError, match="M <="):
        kv_bitmap_attention(torch.randn(1, 4, 9, 64).to(dtype).to(DEV), *cache)  # 9 queries, window of 8
    bad = list(cache)
    bad[0] = bad[0].to(torch.int32)
    with pytest.raises(ValueError, match="k_bitmap must be torch.int64"):
        kv_bitmap_attention(q, *bad)
    bad = list(cache)
    bad[8] = 1000  # more compressed tokens than the bitmap holds
    with pytest.raises(ValueError, match="k_bitmap must be"):
        kv_bitmap_attention(q, *bad)
    with pytest.raises(ValueError, match="out must be"):
        kv_bitmap_attention(q, *cache, out=torch.empty(1, 4, 1, 64, device=DEV))
    with pytest.raises(ValueError, match="kv_mask"):
        kv_bitmap_attention(q, *cache, kv_mask=torch.ones(1, 3, dtype=torch.bool, device=DEV))


def test_block_n_and_shared_memory_are_validated():
    dtype = torch.float16
    cache = make_cache(1, 2, 40, 64, dtype)
    q = torch.randn(1, 4, 1, 64).to(dtype).to(DEV)
    for bn in (48, 8, 256):
        with pytest.raises(ValueError, match="block_n must be a power of two"):
            kv_bitmap_attention(q, *cache, block_n=bn)
    big = make_cache(1, 1, 130, 256, torch.bfloat16)
    q256 = torch.randn(1, 2, 1, 256).to(torch.bfloat16).to(DEV)
    with pytest.raises(ValueError, match="shared memory"):  # about 274 KB on the GPU: refused before launching
        kv_bitmap_attention(q256, *big, block_n=128)


def test_repeated_calls_reset_the_combine_counters():
    dtype = torch.bfloat16
    cache = make_cache(2, 2, 150, 64, dtype, seed=11)
    q = torch.randn(2, 8, 1, 64).to(dtype).to(DEV)
    ref = kv_bitmap_attention_ref(q, *cache)
    first = kv_bitmap_attention(q, *cache, num_splits=3)
    for splits in (3, 1, 4, 3):
        check_close(kv_bitmap_attention(q, *cache, num_splits=splits), ref)
    assert torch.equal(first, kv_bitmap_attention(q, *cache, num_splits=3))


# -- format 2 (offsets derived, not stored) against version 1 (stored offsets) ---------------------------------------------
def _as_version1(st: _BitmapStore):
    """The same rows with their offsets stored (version 1), as ``(bitmap, offsets, values)``."""
    return st.bitmap, token_offsets(st.bitmap, st.keep, st.d), st.values


@pytest.mark.parametrize("d,T,bn,splits", [(64, 64 * 2 + 13, 64, 1), (128, 16 * 5 + 3, 16, 2)])
def test_format2_whole_blocks_tail_and_mask_match_version1(d, T, bn, splits):
    """Whole blocks run unmasked and the tail masked (one split holds both); a kv_mask reaches the unmasked loop;
    the derived-offset path and the stored-offset path give the reference's result."""
    dtype, B, Hkv, G, W = torch.bfloat16, 2, 2, 2, 4
    g = torch.Generator().manual_seed(d + T)
    k_st, v_st = (_BitmapStore(B, Hkv, d, kk, dtype, DEV) for kk in (keep_count(d, 0.7), 13))  # 13: odd, < 16
    k_st.append(torch.randn(B, Hkv, T, d, generator=g).to(dtype).to(DEV))
    v_st.append(torch.randn(B, Hkv, T, d, generator=g).to(dtype).to(DEV))
    assert k_st.offsets is None and k_st.version == 2
    kw, vw = torch.randn(2, B, Hkv, W, d, generator=g).to(dtype).to(DEV)
    q = torch.randn(B, Hkv * G, 2, d, generator=g).to(dtype).to(DEV)
    mask = torch.ones(B, T + W, dtype=torch.bool, device=DEV)
    mask[0, 3:40] = False  # inside the first whole blocks
    v2 = (k_st.bitmap, None, k_st.values, v_st.bitmap, None, v_st.values, kw, vw, T)
    v1 = (*_as_version1(k_st), *_as_version1(v_st), kw, vw, T)
    # independent reference: plain attention over the stores' dense reconstruction (unpack_bitmap, no offsets)
    k = torch.cat([k_st.dense(), kw], 2).float().repeat_interleave(G, 1)
    v = torch.cat([v_st.dense(), vw], 2).float().repeat_interleave(G, 1)
    s = q.float() @ k.transpose(-1, -2) * d**-0.5
    allowed = mask[:, None, None, :] & (torch.arange(T + W, device=DEV) <= T + W - 2 + torch.arange(2, device=DEV)[:, None])
    want = (torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v).to(dtype)
    ref = kv_bitmap_attention_ref(q, *v2, kv_mask=mask)
    check_close(ref, want)
    for args in (v2, v1):
        out = torch.full_like(q, float("nan"))
        check_close(kv_bitmap_attention(q, *args, kv_mask=mask, out=out, block_n=bn, num_splits=splits), ref)


def test_format2_keep_everything_and_chunk_edges():
    """keep = d (nothing pruned: block_n * keep is a power of two, the zero slot sits past it) and keep = 1."""
    dtype, B, Hkv, d, T = torch.float16, 1, 1, 64, 70
    g = torch.Generator().manual_seed(5)
    k_st, v_st = _BitmapStore(B, Hkv, d, d, dtype, DEV), _BitmapStore(B, Hkv, d, 1, dtype, DEV)
    k_st.append(torch.randn(B, Hkv, T, d, generator=g).to(dtype).to(DEV))
    v_st.append(torch.randn(B, Hkv, T, d, generator=g).to(dtype).to(DEV))
    kw, vw = torch.randn(2, B, Hkv, 3, d, generator=g).to(dtype).to(DEV)
    q = torch.randn(B, 3, 1, d, generator=g).to(dtype).to(DEV)
    args = (k_st.bitmap, None, k_st.values, v_st.bitmap, None, v_st.values, kw, vw, T)
    check_close(kv_bitmap_attention(q, *args, num_splits=1), kv_bitmap_attention_ref(q, *args))


@pytest.mark.parametrize("aligned", [True, False])
def test_pair_expansion_and_its_unaligned_fallback(aligned):
    """Whole blocks of 16-bit values expand two elements per 32-bit word when every row starts 4-byte aligned
    (odd keep counts included); values stored at an odd element offset take the one-element path; both give the
    reference, at head_dim 256 and with a partial last block."""
    dtype, B, Hkv, d, T = torch.bfloat16, 1, 2, 256, 16 * 3 + 5
    g = torch.Generator().manual_seed(7)
    k_st, v_st = (_BitmapStore(B, Hkv, d, kk, dtype, DEV) for kk in (keep_count(d, 0.7), 101))  # 77 and 101: odd
    k_st.append(torch.randn(B, Hkv, T, d, generator=g).to(dtype).to(DEV))
    v_st.append(torch.randn(B, Hkv, T, d, generator=g).to(dtype).to(DEV))
    k_vals, v_vals = k_st.values, v_st.values
    if not aligned:  # the same values one element into a larger buffer: rows start 2 bytes off a 4-byte boundary
        k_vals, v_vals = (torch.cat([x.new_zeros(B, Hkv, 1), x], -1)[..., 1:] for x in (k_vals, v_vals))
    assert _pairs(k_vals, k_st.keep) == _pairs(v_vals, v_st.keep) == aligned
    kw, vw = torch.randn(2, B, Hkv, 4, d, generator=g).to(dtype).to(DEV)
    q = torch.randn(B, Hkv * 3, 1, d, generator=g).to(dtype).to(DEV)
    args = (k_st.bitmap, None, k_vals, v_st.bitmap, None, v_vals, kw, vw, T)
    out = torch.full_like(q, float("nan"))
    check_close(kv_bitmap_attention(q, *args, out=out, block_n=16, num_splits=2), kv_bitmap_attention_ref(q, *args))


def test_token_offsets_are_the_version1_offsets():
    g = torch.Generator().manual_seed(0)
    for d, keep in ((16, 5), (64, 19), (128, 38), (256, 7)):
        x = torch.randn(2, 3, 12, d, generator=g)  # 12 * 16 elements: whole tiles
        bt = pack_topk(x, keep)
        assert torch.equal(token_offsets(bt.bitmap, keep, d), bt.offsets), (d, keep)


def test_format2_launcher_checks():
    dtype = torch.float16
    q = torch.randn(1, 4, 1, 64).to(dtype).to(DEV)
    cache = list(make_cache(1, 2, 40, 64, dtype))  # 32 compressed tokens
    bad = list(cache)
    bad[2] = cache[2][..., :-1]  # not n_compressed * k values
    with pytest.raises(ValueError, match="n_compressed \\* keep"):
        kv_bitmap_attention(q, *bad)
    with pytest.raises(ValueError, match="k_keep"):
        kv_bitmap_attention(q, *cache, k_keep=65)
    shared = list(cache)
    shared[2] = cache[2][:, :1].expand(1, 2, cache[2].shape[-1])  # one buffer for both heads: needs offsets
    with pytest.raises(ValueError, match="needs k_offsets"):
        kv_bitmap_attention(q, *shared)
    v1 = list(cache)
    v1[1] = token_offsets(cache[0], cache[2].shape[-1] // 32, 64)
    with pytest.raises(ValueError, match="no offsets"):
        kv_bitmap_attention(q, *v1, k_keep=19)
