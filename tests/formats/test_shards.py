"""Shard planning and writing: huggingface_hub's planner for both writers, transformers-loadable output."""

import json

import pytest
import torch
from helpers import tiny_llama
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

import llmprune
from llmprune.formats.shards import INDEX_FILE, ShardWriter, plan_shards, save_shards

# a: 24 B, b: 10 B, big: 40 B (> 30), c: 16 B
PLAN = [("a", torch.float32, (3, 2)), ("b", torch.bfloat16, (5,)), ("big", torch.float32, (10,)),
        ("c", torch.int64, (2,))]


def _file_keys(directory, name):
    with safe_open(str(directory / name), "pt") as f:
        return list(f.keys())


def test_plan_is_huggingface_hubs_cut():
    got = plan_shards(PLAN, 30)
    # a alone (a + b = 34 > 30); big (40 > 30) gets a shard of its own, placed when met; b + c = 26 <= 30
    assert got == {"model-00001-of-00003.safetensors": ["a"], "model-00002-of-00003.safetensors": ["big"],
                   "model-00003-of-00003.safetensors": ["b", "c"]}
    real = {k: torch.zeros(shape, dtype=dtype) for k, dtype, shape in PLAN}
    assert got == split_torch_state_dict_into_shards(real, max_shard_size=30).filename_to_tensors
    assert plan_shards(PLAN, "1KB") == {"model.safetensors": ["a", "b", "big", "c"]}
    assert plan_shards(PLAN, 10**3, single_name=False) == {"model-00001-of-00001.safetensors": ["a", "b", "big", "c"]}
    assert plan_shards([], 30) == {"model.safetensors": []}


def test_streaming_writer_and_in_memory_save_cut_the_same_shards(tmp_path):
    vals = {"a": torch.randn(3, 2), "b": torch.randn(5).bfloat16(), "big": torch.randn(10), "c": torch.tensor([7, 8])}
    (tmp_path / "stream").mkdir()
    w = ShardWriter(tmp_path / "stream", PLAN, max_shard_size=30)
    for k in ("c", "big", "a", "b"):  # any order
        w.write(k, vals[k])
    w.finish()
    save_shards(vals, tmp_path / "mem", max_shard_size=30)
    for d in ("stream", "mem"):
        index = json.loads((tmp_path / d / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == 24 + 10 + 40 + 16
        assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "big": "model-00002-of-00003.safetensors",
                                       "b": "model-00003-of-00003.safetensors", "c": "model-00003-of-00003.safetensors"}
        for name in set(index["weight_map"].values()):
            assert _file_keys(tmp_path / d, name) == sorted(k for k, f in index["weight_map"].items() if f == name)
            with safe_open(str(tmp_path / d / name), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                assert all(torch.equal(f.get_tensor(k), vals[k]) for k in f.keys())


def test_save_shards_single_file_and_views(tmp_path):
    base = torch.arange(12.0)
    save_shards({"view": base[2:6], "other": torch.ones(2)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no index for one shard
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("view"), base[2:6], rtol=0, atol=0)


@pytest.mark.parametrize("streaming", [False, True])
def test_multi_shard_checkpoint_loads_back_with_transformers(tmp_path, streaming):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.config.save_pretrained(tmp_path)
    limit = 40_000  # bytes: the tiny model (~0.3 MB) spreads over many shards
    if streaming:
        writer = ShardWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], limit)
        for k in reversed(list(state)):
            writer.write(k, state[k])
        writer.finish()
    else:
        save_shards(state, tmp_path, limit)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(state) and sorted(set(index["weight_map"].values())) == files
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    got = back.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())


def test_packed_multi_shard_round_trip(tmp_path):
    from llmprune.runtime.sparse24 import load_packed, save_packed

    model = tiny_llama().to(torch.bfloat16)
    llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), device="cpu", progress=False)
    save_packed(model, tmp_path / "many", max_shard_bytes=30_000)
    save_packed(model, tmp_path / "one")
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 3 and "model.layers.0.mlp.up_proj.values" in index["weight_map"]
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    many, one = load_packed(tmp_path / "many"), load_packed(tmp_path / "one")
    assert set(many.state_dict()) == set(one.state_dict())
    assert all(torch.equal(v, one.state_dict()[k]) for k, v in many.state_dict().items())
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(many(ids).logits, one(ids).logits, rtol=0, atol=0)
