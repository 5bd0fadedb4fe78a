"""On the CPU a 16-bit model is pruned in fp32, one layer at a time, and saved in its own dtype (issue 19, bug 7)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama

import llmprune
from llmprune.engine.layerwise import default_compute_dtype

CALIB = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_default_compute_dtype():
    model = tiny_llama()
    cpu = torch.device("cpu")
    assert default_compute_dtype(model, cpu) is None  # fp32 already
    assert default_compute_dtype(model.to(torch.bfloat16), cpu) is torch.float32
    assert default_compute_dtype(model, torch.device("cuda")) is None  # GPUs run 16-bit matmuls natively


@pytest.mark.parametrize("cfg", [llmprune.WandaConfig(sparsity="2:4"), llmprune.SparseGPTConfig(sparsity=0.5)],
                         ids=["wanda", "sparsegpt"])
def test_bf16_model_pruned_in_fp32_equals_fp32_run_cast_back(cfg):
    bf16 = tiny_llama().to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same (bf16-representable) weights
    llmprune.prune(bf16, cfg, CALIB, device="cpu", batch_size=2, progress=False)
    llmprune.prune(fp32, cfg, CALIB, device="cpu", batch_size=2, progress=False)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # saved in the model's own dtype
    for (name, a), (_, b) in zip(bf16.named_parameters(), fp32.named_parameters()):
        assert torch.equal(a, b.to(torch.bfloat16)), name
