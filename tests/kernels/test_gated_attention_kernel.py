"""Triton gated decode attention against the torch reference (CPU: TRITON_INTERPRET=1, set in conftest)."""

import pytest
import torch
from helpers import check_close
from llmprune.kernels.gated_attention import block_indices, gated_attention, gated_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(b, hq, hkv, length, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, hkv, length, d, generator=g)
    v = torch.randn(b, hkv, length, d, generator=g)
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def random_mask(b, hkv, nb, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, hkv, nb, generator=g) < keep
    m[..., 0] = True  # first and last block always kept (as the gates do)
    m[..., -1] = True
    return m.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,length,bs,keep", [
    (1, 4, 4, 1, 16, 1.0),      # GQA 1, a single cached token
    (2, 4, 1, 77, 16, 0.5),     # GQA 4, odd length, partial last block
    (1, 8, 2, 333, 32, 0.3),    # GQA 4, odd length, sparse
    (1, 2, 2, 129, 64, 0.1),    # GQA 1, block 64, first + last only
])
def test_kernel_matches_reference(b, hq, hkv, length, bs, keep, dtype):
    q, k, v = make(b, hq, hkv, length, 32, dtype)
    nb = -(-length // bs)
    mask = random_mask(b, hkv, nb, keep)
    out = torch.full_like(q, float("nan"))  # poisoned: every entry must be written
    y = gated_attention(q, k, v, mask, bs, out=out, num_splits=3)
    assert y is out
    check_close(y, gated_attention_ref(q, k, v, mask, bs))


def test_indices_input_splits_and_dense_equivalence():
    dtype = torch.float16
    q, k, v = make(1, 4, 2, 200, 16, dtype, seed=3)
    idx = torch.tensor([[[0, 5, 12, -1, -1], [12, 3, 0, 7, -1]]], dtype=torch.int32, device=DEV)  # unsorted, -1 pad
    ref = gated_attention_ref(q, k, v, idx, 16)
    for splits in (1, 2, 7):
        check_close(gated_attention(q, k, v, idx, 16, num_splits=splits), ref)
    sorted_idx, counts = block_indices(idx, 13)
    assert counts.tolist() == [[3, 4]] and sorted_idx[0, 1, :4].tolist() == [0, 3, 7, 12]
    # all blocks selected == dense attention
    allm = torch.ones(1, 2, 13, dtype=torch.bool, device=DEV)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1))[:, :, 0]
    check_close(gated_attention(q, k, v, allm, 16), dense.to(dtype))


def test_strided_cache_and_scale():
    # a cache view with spare capacity (non-contiguous in L-stride terms) and an explicit scale
    q, k, v = make(1, 4, 2, 300, 32, torch.bfloat16, seed=5)
    kv, vv = k[:, :, :250], v[:, :, :250]
    mask = random_mask(1, 2, 8, 0.5, seed=1)
    check_close(gated_attention(q, kv, vv, mask, 32, scale=0.1), gated_attention_ref(q, kv, vv, mask, 32, scale=0.1))


def test_launcher_checks():
    q, k, v = make(1, 4, 2, 64, 32, torch.float16)
    m = torch.ones(1, 2, 4, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="share dtype"):
        gated_attention(q.float(), k, v, m, 16)
    with pytest.raises(ValueError, match="block_size"):
        gated_attention(q, k, v, m, 24)
    with pytest.raises(ValueError, match="block mask has"):
        gated_attention(q, k, v, m[..., :3], 16)
    with pytest.raises(ValueError, match="out must be"):
        gated_attention(q, k, v, m, 16, out=torch.empty(1, 4, 31, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="shape mismatch"):
        gated_attention(q[:, :3], k, v, m, 16)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="out of range"):
            gated_attention(q, k, v, torch.tensor([[[0, 9], [0, 1]]]), 16)


def test_padded_and_out_of_range_indices_select_nothing():
    """With counts, the counted entries may hold -1 padding or indices past the cache: skipped, never NaN."""
    q, k, v = make(2, 4, 2, 100, 16, torch.float16, seed=7)  # 100 tokens: 7 blocks of 16, the last partial
    idx = torch.tensor([[[3, -1, 0, 9], [6, 7, 200, -1]], [[-1, -1, -1, -1], [1, 2, 3, 4]]], dtype=torch.int32, device=DEV)
    counts = torch.tensor([[4, 4], [4, 2]], dtype=torch.int32, device=DEV)
    valid = torch.tensor([[[3, 0, -1, -1], [6, -1, -1, -1]], [[-1, -1, -1, -1], [1, 2, -1, -1]]], dtype=torch.int32,
                         device=DEV)
    ref = gated_attention_ref(q, k, v, valid, 16)
    for splits in (1, 3):
        y = gated_attention(q, k, v, idx, 16, counts=counts, num_splits=splits)
        assert not y.isnan().any()
        check_close(y, ref)
        assert (y[1, :2] == 0).all()  # a head with nothing valid selected outputs zeros


def test_repeated_calls_and_more_splits_than_blocks():
    # the in-kernel combine's arrival counters must be back at zero after every call
    q, k, v = make(1, 8, 2, 300, 32, torch.bfloat16, seed=9)
    mask = random_mask(1, 2, 10, 0.3, seed=4)
    ref = gated_attention_ref(q, k, v, mask, 32)
    first = gated_attention(q, k, v, mask, 32, num_splits=7)
    for splits in (7, 7, 16, 2):
        check_close(gated_attention(q, k, v, mask, 32, num_splits=splits), ref)
    assert torch.equal(first, gated_attention(q, k, v, mask, 32, num_splits=7))


def test_configs_the_gpu_cannot_run_are_refused():
    from llmprune.kernels.gated_attention import gated_config, shared_bytes

    q, k, v = make(1, 2, 1, 512, 256, torch.float16)
    with pytest.raises(ValueError, match="shared memory"):
        gated_attention(q, k, v, torch.ones(1, 1, 2, dtype=torch.bool, device=DEV), 256)
    with pytest.raises(ValueError, match="num_splits"):
        gated_attention(q, k, v, torch.ones(1, 1, 8, dtype=torch.bool, device=DEV), 64, num_splits=65)
    cfg = gated_config(8, 52, 4, 128, 64, num_sms=132)
    assert cfg["NUM_SPLITS"] == 26 and shared_bytes(cfg, 2) <= 227 * 1024  # one split per 2 selected blocks
