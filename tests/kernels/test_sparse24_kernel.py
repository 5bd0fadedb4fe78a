"""Triton 2:4 linear against the torch reference (CPU: TRITON_INTERPRET=1, set in conftest)."""

import pytest
import torch
from helpers import check_close
from llmprune.kernels.sparse24_linear import heuristic_config, sparse24_linear, sparse24_linear_ref

from llmprune.formats.sparse24 import pack_24
from llmprune.sparsity import nm_mask

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def packed(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = w * nm_mask(w.abs(), 2, 4)
    w[0, :8] = 0  # groups with fewer than two non-zeros
    w[-1, 4:8] = torch.tensor([0.0, 0.0, 1.5, 0.0])
    v, m = pack_24(w.to(dtype))
    return v.to(DEV), m.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(48, 200), (33, 96), (64, 1028)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_kernel_matches_reference(n, k, m, dtype):
    v, meta = packed(n, k, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    bias = torch.randn(n, generator=g).to(dtype).to(DEV)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)  # poisoned: every entry must be written
    y = sparse24_linear(x, v, meta, bias, out=out)
    assert y is out
    check_close(y, sparse24_linear_ref(x, v, meta, bias))
    check_close(sparse24_linear(x, v, meta), sparse24_linear_ref(x, v, meta))


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("split,block_g", [(2, 16), (3, 32), (1, 128)])
def test_kernel_configs_split_k_and_masking(m, split, block_g):
    # in=1028: 257 groups, never a multiple of the K block; split-K partials + reduce kernel (+ bias).
    dtype = torch.bfloat16
    n, k = 40, 1028
    v, meta = packed(n, k, dtype, seed=2)
    x = torch.randn(m, k).to(dtype).to(DEV)
    bias = torch.randn(n).to(dtype).to(DEV)
    cfg = heuristic_config(m, n, k, torch.device(DEV))
    cfg.update(SPLIT_K=split, BLOCK_G=block_g if not cfg["USE_DOT"] else max(block_g, 16))
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    check_close(sparse24_linear(x, v, meta, bias, out=out, config=cfg), sparse24_linear_ref(x, v, meta, bias))


def test_many_rows_span_several_row_blocks():
    # The launcher takes any M (choosing unpack + F.linear for prefill is Sparse24Linear's job): 100 rows are
    # 7 row blocks of 16, the last one partial.
    v, meta = packed(24, 64, torch.float16)
    x = torch.randn(100, 64).to(torch.float16).to(DEV)
    check_close(sparse24_linear(x, v, meta), sparse24_linear_ref(x, v, meta))


def test_launcher_checks():
    v, meta = packed(16, 64, torch.float16)
    x = torch.randn(2, 64).to(torch.float16).to(DEV)
    with pytest.raises(ValueError, match="share dtype"):
        sparse24_linear(x.float(), v, meta)
    with pytest.raises(ValueError, match="K/2"):
        sparse24_linear(torch.randn(2, 60).half().to(DEV), v, meta)
    with pytest.raises(ValueError, match="meta must be int32"):
        sparse24_linear(x, v, meta.long())
    with pytest.raises(ValueError, match="contiguous"):
        sparse24_linear(x, torch.cat([v, v], 1)[:, ::2], meta)
    with pytest.raises(ValueError, match="out must be"):
        sparse24_linear(x, v, meta, out=torch.empty(2, 15, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        sparse24_linear(x, v, meta, bias=torch.zeros(3, dtype=torch.float16, device=DEV))


def test_split_k_finishes_in_one_launch_and_resets_its_counters():
    from llmprune.kernels import _device

    dtype = torch.float16
    v, meta = packed(24, 1024, dtype, seed=5)
    x = torch.randn(1, 1024).to(dtype).to(DEV)
    ref = sparse24_linear_ref(x, v, meta)
    cfg = dict(heuristic_config(1, 24, 1024, torch.device(DEV)), SPLIT_K=4, BLOCK_G=32)
    for _ in range(3):
        check_close(sparse24_linear(x, v, meta, config=cfg), ref)
    assert int(_device.arrival_counters(x.device, 1).abs().sum()) == 0


def test_configs_are_validated_before_launch():
    v, meta = packed(16, 64, torch.float16)
    x = torch.randn(1, 64).to(torch.float16).to(DEV)
    cfg = heuristic_config(1, 16, 64, torch.device(DEV))
    with pytest.raises(ValueError, match="shared memory"):
        sparse24_linear(x, v, meta, config=dict(cfg, BLOCK_N=256, BLOCK_G=512))
    with pytest.raises(ValueError, match="powers of two"):
        sparse24_linear(x, v, meta, config=dict(cfg, BLOCK_N=24))
    with pytest.raises(ValueError, match="lacks"):
        sparse24_linear(x, v, meta, config={"BLOCK_N": 16})
