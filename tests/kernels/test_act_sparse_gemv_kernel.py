"""Triton input-sparse GEMV against the torch reference (CPU: TRITON_INTERPRET=1, set in conftest)."""

import math

import pytest
import torch
from helpers import check_close
from llmprune.kernels.act_sparse_gemv import (
    act_sparse_config,
    act_sparse_gemv,
    act_sparse_gemv_ref,
    check_config,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def case(m, k, n, sparsity, dtype, seed=0):
    """``x [m, k]``, ``wt [k, n]``, ``bias [n]`` and the threshold zeroing ``sparsity`` of ``x``'s entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    wt = torch.randn(k, n, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    a = x.float().abs().flatten().sort().values
    j = round(sparsity * a.numel())
    t = 0.0 if j == 0 else math.inf if j == a.numel() else float(a[j])
    return x.to(DEV), wt.to(DEV), bias.to(DEV), t


CASES = [(m, k, n, s, torch.float16) for m, k, n in [(1, 200, 48), (3, 97, 130), (4, 64, 33)]
         for s in (0.0, 0.5, 0.9, 1.0)]
CASES += [(m, k, n, s, dt) for dt in (torch.bfloat16, torch.float32) for m, k, n, s in [(1, 97, 130, 0.5), (2, 64, 33, 0.9)]]
# one bf16 row: even N takes the paired-column path (two bf16 per int32 word), odd N the plain one
CASES += [(1, 200, 48, s, torch.bfloat16) for s in (0.0, 0.9)] + [(1, 64, 33, 0.5, torch.bfloat16)]


@pytest.mark.parametrize("m,k,n,sparsity,dtype", CASES)
def test_kernel_matches_reference(m, k, n, sparsity, dtype):
    x, wt, bias, t = case(m, k, n, sparsity, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)  # poisoned: every entry must be written
    y = act_sparse_gemv(x, wt, t, bias, out=out)
    assert y is out
    check_close(y, act_sparse_gemv_ref(x, wt, t, bias))
    if sparsity == 1.0:  # nothing kept: exactly the bias
        assert torch.equal(act_sparse_gemv(x, wt, t), torch.zeros(m, n, dtype=dtype, device=DEV))
        assert torch.equal(y, bias.expand(m, n))
    else:
        check_close(act_sparse_gemv(x, wt, t), act_sparse_gemv_ref(x, wt, t))


@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (5, torch.float16), (1, torch.bfloat16)])
def test_weight_rows_of_zeroed_inputs_are_never_read(m, dtype):
    # Rows of W^T whose input every row of x zeroes are NaN: any read of them would poison the output.
    x, wt, bias, t = case(m, 150, 40, 0.9, dtype, seed=3)
    dropped = (x.float().abs() < t).all(0)
    assert dropped.sum() > 50
    poisoned = wt.clone()
    poisoned[dropped] = float("nan")
    y = act_sparse_gemv(x, poisoned, t, bias)
    check_close(y, act_sparse_gemv_ref(x, wt, t, bias))


@pytest.mark.parametrize("m,split,block_k", [(2, 3, 16), (2, 4, 8), (1, 3, 16)])
def test_split_k_configs_and_tails(m, split, block_k):
    # K = 203 is no multiple of any block; splits finish in the same launch (arrival counters).
    x, wt, bias, t = case(m, 203, 70, 0.5, torch.bfloat16, seed=5)
    cfg = act_sparse_config(m, 70, 203, num_sms=4)
    cfg.update(SPLIT_K=split, BLOCK_K=block_k, BLOCK_N=32)
    out = torch.full((m, 70), float("nan"), dtype=torch.bfloat16, device=DEV)
    check_close(act_sparse_gemv(x, wt, t, bias, out=out, config=cfg), act_sparse_gemv_ref(x, wt, t, bias))
    check_close(act_sparse_gemv(x, wt, t, config=cfg), act_sparse_gemv_ref(x, wt, t))  # counters were reset


def test_bf16_weight_not_on_a_word_boundary():
    # A contiguous W^T view starting at an odd bf16 element cannot be read as int32 pairs: the plain path runs.
    x, wt, bias, t = case(1, 64, 48, 0.5, torch.bfloat16, seed=7)
    buf = torch.empty(1 + wt.numel(), dtype=torch.bfloat16, device=DEV)
    shifted = buf[1:].view(64, 48)
    shifted.copy_(wt)
    assert shifted.data_ptr() % 4 != 0
    check_close(act_sparse_gemv(x, shifted, t, bias), act_sparse_gemv_ref(x, wt, t, bias))


def test_threshold_is_exact_at_the_boundary():
    # Entries equal to the threshold are kept, those just below zeroed (|x| >= t keeps, in fp32).
    x = torch.tensor([[0.5, -0.5, 0.25, -0.75]], dtype=torch.float32, device=DEV)
    wt = torch.eye(4, dtype=torch.float32, device=DEV)
    y = act_sparse_gemv(x, wt, 0.5)
    assert torch.equal(y.cpu(), torch.tensor([[0.5, -0.5, 0.0, -0.75]]))


def test_config_is_pure_and_fills_the_gpu():
    cfg = act_sparse_config(1, 4096, 4096, num_sms=132)
    check_config(cfg, 1)
    assert cfg["BLOCK_M"] == 1 and cfg["BLOCK_M"] * cfg["BLOCK_K"] == 32
    assert (4096 // cfg["BLOCK_N"]) * cfg["SPLIT_K"] >= 2 * 132
    assert act_sparse_config(4, 14336, 4096, num_sms=132)["BLOCK_M"] == 4
    assert act_sparse_config(1, 14336, 4096, num_sms=4)["SPLIT_K"] == 1  # enough tiles already


def test_launcher_checks():
    x, wt, bias, t = case(2, 64, 16, 0.5, torch.float16)
    with pytest.raises(ValueError, match="share dtype"):
        act_sparse_gemv(x.float(), wt, t)
    with pytest.raises(ValueError, match="W\\^T"):
        act_sparse_gemv(x, wt[:60], t)
    with pytest.raises(ValueError, match="rows"):
        act_sparse_gemv(torch.zeros(9, 64, dtype=torch.float16, device=DEV), wt, t)
    with pytest.raises(ValueError, match="contiguous"):
        act_sparse_gemv(x, torch.cat([wt, wt], 1)[:, ::2], t)
    with pytest.raises(ValueError, match="threshold"):
        act_sparse_gemv(x, wt, float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        act_sparse_gemv(x, wt, -1.0)
    with pytest.raises(ValueError, match="out must be"):
        act_sparse_gemv(x, wt, t, out=torch.empty(2, 15, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        act_sparse_gemv(x, wt, t, bias=torch.zeros(3, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="BLOCK_M"):
        act_sparse_gemv(x, wt, t, config=dict(act_sparse_config(2, 16, 64, num_sms=4), BLOCK_M=1))


def test_gpu_suite_check_runs_interpreted_at_small_sizes(monkeypatch):
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("the GPU run covers this")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    import gpu_suite

    monkeypatch.setattr(gpu_suite, "DEVICE", "cpu")
    gen = torch.Generator().manual_seed(0)
    for p in (dict(n=40, k=96, m=1, sparsity=0.5, dtype="bf16"), dict(n=24, k=72, m=4, sparsity=0.9, dtype="fp16")):
        res = gpu_suite.check_act_sparse(p, gen)
        assert res["ok"], res
