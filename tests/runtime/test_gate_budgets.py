"""Per-layer gate budgets: the allocation, the block-attention entropy, and the runtime applying them per layer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama

from llmprune.calibration.attn_entropy import attention_entropy, block_entropy
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.runtime.gates.budgets import budgets_at, layer_sparsities
from llmprune.runtime.gates.gate import GateConfig
from llmprune.runtime.gates.runtime import attach_gates, detach_gates
from llmprune.runtime.gates.training import train_gates


def test_layer_sparsities_hit_the_mean_and_follow_the_scores():
    # keeps ~ c * score / max in units of 1/1000, mean keep 0.1: scores 1, 0.5, 0.5 -> c solves c*(1+.5+.5)=0.3
    sp = layer_sparsities([1.0, 0.5, 0.5], 0.9, power=1)
    assert sp == pytest.approx([0.85, 0.925, 0.925])
    assert sum(sp) / 3 == pytest.approx(0.9, abs=1e-12)
    assert layer_sparsities([3.0, 1.0, 2.0], 0.9, power=0) == pytest.approx([0.9, 0.9, 0.9])
    assert layer_sparsities([1.0, 0.5, 0.5], 0.9) == pytest.approx([0.94, 0.88, 0.88])  # default -1: weights 1, 2, 2
    # bounds: the top layer cannot drop below min_sparsity, the rest is spread to hold the mean
    sp = layer_sparsities([10.0, 1.0, 1.0, 1.0], 0.9, power=1, min_sparsity=0.8)
    assert sp[0] == pytest.approx(0.8) and sum(sp) / 4 == pytest.approx(0.9)
    assert all(0.8 - 1e-12 <= s <= 0.98 + 1e-12 for s in sp)


def test_budgets_hold_only_at_their_mean():
    assert budgets_at([0.8, 0.9], 0.85) == [0.8, 0.9]
    assert budgets_at([0.8, 0.9], 0.9) is None and budgets_at([0.8, 0.9], None) is None
    assert budgets_at(None, 0.85) is None and budgets_at([], 0.85) is None


@pytest.mark.parametrize("kwargs,needle", [
    ({"scores": [1.0], "mean": 1.0}, "strictly between"), ({"scores": [], "mean": 0.5}, "scores"),
    ({"scores": [1.0, float("nan")], "mean": 0.5}, "scores"), ({"scores": [1.0], "mean": 0.5, "power": float("inf")}, "power"),
    ({"scores": [1.0], "mean": 0.5, "min_sparsity": 0.6}, "bounds"),
])
def test_layer_sparsities_bad_inputs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        layer_sparsities(**kwargs)


def test_block_entropy_hand_built():
    s, bs = 8, 2  # 4 blocks of 2 tokens; rows 6 and 7 see all 4 blocks
    even = torch.tril(torch.ones(s, s))
    even = even / even.sum(-1, keepdim=True)  # uniform over the causal tokens
    total, rows = block_entropy(even[None], bs, min_blocks=4)
    # row 7: 8 tokens, 2 per block -> entropy 1; row 6: 7 tokens, blocks hold 2, 2, 2, 1 of them
    row6 = -sum(p * math.log(p) for p in (2 / 7, 2 / 7, 2 / 7, 1 / 7)) / math.log(4)
    assert rows == 2 and total == pytest.approx(1.0 + row6)
    one = torch.zeros(s, s)
    one[:, 0] = 1.0  # all attention on the first token: one block
    total, rows = block_entropy(one[None], bs, min_blocks=3)
    assert rows == 4 and total == pytest.approx(0.0, abs=1e-12)
    half = torch.zeros(1, s, s)
    half[0, :, 0] = half[0, :, 6] = 0.5  # two blocks of four, equally: log 2 / log 4
    total, rows = block_entropy(half, bs, min_blocks=4)
    assert total / rows == pytest.approx(math.log(2) / math.log(4))


@pytest.fixture(scope="module")
def gated():
    model = tiny_llama(max_position_embeddings=512)
    cfg = GateConfig.for_model(model, block_size=16, gate_dim=16)
    calib = torch.randint(3, 128, (4, 96), generator=torch.Generator().manual_seed(0))
    gates, _ = train_gates(model, calib, cfg, steps=10, lr=3e-3, progress=False)
    return model, gates


def test_attention_entropy_restores_the_attention_implementation(gated):
    model, _ = gated
    impl = model.config._attn_implementation
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(2))
    scores = attention_entropy(model, ids, block_size=16, min_blocks=2)
    assert len(scores) == model.config.num_hidden_layers and all(0.0 <= x <= 1.0 + 1e-9 for x in scores)
    assert model.config._attn_implementation == impl


def test_runtime_applies_one_sparsity_per_layer(gated):
    model, gates = gated
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    n = model.config.num_hidden_layers
    with torch.no_grad():
        rt = attach_gates(model, gates, attn_sparsity=0.9)
        try:
            ref = model(ids).logits
            kept_uniform, causal = rt.kept_blocks, rt.causal_blocks
            rt.layer_sparsity = [0.9] * n  # the same sparsity per layer: the same selection
            rt.reset_stats()
            assert torch.equal(model(ids).logits, ref) and rt.kept_blocks == kept_uniform
            rt.layer_sparsity = [0.9] + [0.0] * (n - 1)  # only layer 0 sparse: the others keep every causal block
            rt.reset_stats()
            assert rt.kept_blocks == 0 and rt.causal_blocks == 0
            model(ids)
            assert rt.causal_blocks == causal
            assert rt.kept_blocks == kept_uniform // n + causal * (n - 1) // n
        finally:
            detach_gates(model)


def test_cli_train_gates_entropy_allocation_is_recorded_and_applied(tiny_model_dir, tiny_calib_file, tmp_path):
    import json

    from llmprune.cli import main
    from llmprune.runtime.load import load_model

    out = tmp_path / "gates"
    argv = ["train-gates", str(tiny_model_dir), "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "64",
            "--block-size", "16", "--gate-dim", "8", "--steps", "2", "--attn-sparsity", "0.6", "--allocation",
            "entropy", "-o", str(out), "-q"]
    assert main(argv) == 0
    meta = json.loads((out / "attn_gates.json").read_text())
    ls = meta["layer_sparsity"]
    assert meta["allocation"] == "entropy" and len(ls) == len(meta["attn_entropy"]) == 2
    assert sum(ls) / 2 == pytest.approx(0.6, abs=1e-9)
    model = load_model(str(tiny_model_dir), dtype="float32", gates=False)
    rt = attach_gates(model, out)  # the recorded mean and its per-layer budgets
    assert rt.sparsity == 0.6 and rt.layer_sparsity == ls
    rt = attach_gates(model, out, attn_sparsity=0.3)  # another mean: uniform
    assert rt.sparsity == 0.3 and rt.layer_sparsity is None
    detach_gates(model)
    meta["layer_sparsity"] = [0.5]
    (out / "attn_gates.json").write_text(json.dumps(meta))
    with pytest.raises(LlmpruneError, match="layer_sparsity must be a list of 2 numbers"):
        attach_gates(model, out)
