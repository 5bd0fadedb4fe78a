"""Triton decode attention over the bitmap KV cache against the torch reference (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch
from helpers import check_close
from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention, kv_bitmap_attention_ref

from llmprune.formats.bitmap import keep_count
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
