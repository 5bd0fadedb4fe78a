"""CFSP ``allocation: uniform`` gives one FFN size for every layer (issue 19, bug 2)."""

from __future__ import annotations

import json

import torch
from helpers import tiny_llama

import llmprune
from llmprune.model.structured import layer_sizes
from llmprune.prune.allocation import allocate_budget, allocate_with_groups
from llmprune.prune.methods.cfsp import CFSPConfig

IDS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_uniform_budget_is_one_rounded_size():
    # SmolLM2 shape: 0.7 * 1536 = 1075.2 rounds to 1072 in every layer (the old total matching gave 1080/1072)
    assert set(allocate_budget(None, 0.3, 0.0, 0.8, 8, [1536] * 30)) == {1072}
    # 4 x 128 at 0.3: 89.6 -> 88 everywhere, although the total then misses the target by 6 channels
    assert allocate_budget(None, 0.3, 0.0, 0.8, 8, [128] * 4) == [88] * 4
    kept, groups = allocate_with_groups(None, 0.3, 0.0, 0.8, 8, [128] * 4, 3 * 64, [2] * 4, [4 * 64 * 16] * 4)
    assert len(set(kept)) == 1 and len(set(groups)) == 1
    # the coarse allocation still matches the total
    assert abs(sum(128 - k for k in allocate_budget([1.0, 2.0, 3.0, 4.0], 0.3, 0.0, 0.8, 8, [128] * 4)) - 153.6) <= 4


def test_uniform_cfsp_saves_plain_dense_checkpoint(tiny_model_dir, tiny_calib_file, tmp_path):
    from llmprune.config import CalibConfig, Recipe

    model = tiny_llama(num_hidden_layers=4)
    model.save_pretrained(tiny_model_dir)
    recipe = Recipe(stages=[CFSPConfig(sparsity=0.3, allocation="uniform")],
                    calibration=CalibConfig(source=str(tiny_calib_file), nsamples=4, seqlen=16, batch_size=2))
    res = llmprune.compress(str(tiny_model_dir), recipe, tmp_path / "u", device="cpu", progress=False)
    cfg = json.loads((res.output / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["intermediate_size"] == 88
    assert "llmprune_intermediate_sizes" not in cfg
    assert res.metadata.get("format", "dense") == "dense"  # not "structured": plain transformers loads it
    assert json.loads((res.output / "llmprune.json").read_text())["format"] == "dense"
    # the achieved sparsity is reported as measured: 40 of 128 channels removed per layer
    assert abs(res.report.overall_sparsity - 40 / 128) < 1e-6
    loaded = llmprune.load(res.output)
    assert layer_sizes(loaded)[0] == [88] * 4
