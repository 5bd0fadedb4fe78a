"""Streaming compress (meta skeleton + memory-mapped weights + incremental shards) == the in-memory path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import tiny_llama, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import llmprune
from llmprune.config import CalibConfig, Recipe
from llmprune.engine.streaming import parse_size
from llmprune.formats.shards import ShardWriter


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(cfg, calib, **kw):
    return Recipe(stages=[cfg], calibration=CalibConfig(source=str(calib), nsamples=6, seqlen=16, batch_size=4), **kw)


@pytest.mark.parametrize(
    ("arch", "cfg"),
    [("llama-tied", llmprune.WandaConfig(sparsity="2:4")),
     ("llama-tied", llmprune.SparseGPTConfig(sparsity=0.5, blocksize=32)),
     ("opt", llmprune.WandaConfig(sparsity=0.5, ignore=["fc2"])),
     ("opt", llmprune.MagnitudeConfig(sparsity="4:8"))],
    ids=["llama-wanda", "llama-sparsegpt", "opt-wanda-ignore", "opt-magnitude"],
)
def test_streaming_identical_to_in_memory(tmp_path, tiny_calib_file, arch, cfg):
    model = tiny_llama(tie_word_embeddings=True, num_hidden_layers=3) if arch == "llama-tied" else tiny_model("opt")
    src = tmp_path / "model"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    recipe = _recipe(cfg, tiny_calib_file)
    a = llmprune.compress(str(src), recipe, tmp_path / "mem", device="cpu", progress=False, low_memory=False)
    b = llmprune.compress(str(src), recipe, tmp_path / "stream", device="cpu", progress=False, low_memory=True)
    ta, tb = _tensors(a.output), _tensors(b.output)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a.output / "config.json").read_text()) == json.loads((b.output / "config.json").read_text())
    ma, mb = llmprune.formats.checkpoint.read_metadata(a.output), llmprune.formats.checkpoint.read_metadata(b.output)
    assert ma["sparsity"] == mb["sparsity"] and ma["recipe"] == mb["recipe"] and ma["dtype"] == mb["dtype"]
    assert "engine" not in ma and mb["engine"]["streaming"] is True
    assert [m.name for m in a.report.modules] == [m.name for m in b.report.modules]
    assert not (tmp_path / "stream.partial").exists()
    reloaded = llmprune.load(str(b.output))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_small_shards_index_and_bf16(tmp_path, tiny_calib_file):
    from llmprune.engine.streaming import StreamOptions, compress_streaming

    src = tmp_path / "model"
    tiny_llama(num_hidden_layers=2).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    recipe = _recipe(llmprune.WandaConfig(sparsity="2:4"), tiny_calib_file)
    # max_memory=1 byte: activations spill to disk (offload_dir) between layers
    opts = StreamOptions(max_shard_size="40KB", max_memory=1, offload_dir=tmp_path / "offload")
    res = compress_streaming(None, src, recipe, tmp_path / "out", device=torch.device("cpu"), dtype="bfloat16",
                             progress=False, options=opts)
    # On disk the activations cannot all be in flight: the two-pass ("layer") order, as recorded.
    assert llmprune.formats.checkpoint.read_metadata(res.output)["calibration"]["sequential"] == "layer"
    recipe.calibration = dataclasses.replace(recipe.calibration, sequential="layer")
    ref = llmprune.compress(str(src), recipe, tmp_path / "ref", device="cpu", dtype="bfloat16", progress=False,
                            low_memory=False)
    assert all(torch.equal(t, _tensors(ref.output)[k]) for k, t in _tensors(res.output).items())
    index = json.loads((res.output / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((res.output / f).is_file() for f in files)
    tensors = _tensors(res.output)
    assert set(tensors) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = llmprune.load(str(res.output))
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (model.model.layers[1].mlp.up_proj.weight == 0).float().mean().item() == 0.5


def test_shard_writer_any_order(tmp_path):
    plan = [("a", torch.float32, (3, 2)), ("b", torch.bfloat16, (5,)), ("c", torch.int64, (2,))]
    w = ShardWriter(tmp_path, plan, max_shard_size=30)
    vals = {"c": torch.tensor([7, 8]), "a": torch.randn(3, 2), "b": torch.randn(5).bfloat16()}
    for k, v in vals.items():
        w.write(k, v)
    w.finish()
    got = _tensors(tmp_path)
    assert all(torch.equal(got[k], v) for k, v in vals.items())
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 5 * 10**8 and parse_size(12) == 12


def test_auto_mode_and_unsupported(tmp_path, tiny_model_dir, tiny_calib_file):
    recipe = _recipe(llmprune.WandaConfig(sparsity="2:4"), tiny_calib_file)
    res = llmprune.compress(str(tiny_model_dir), recipe, tmp_path / "auto", device="cpu", progress=False)
    assert "engine" not in res.metadata  # small model: in memory by default
    two = _recipe(llmprune.WandaConfig(sparsity=0.25), tiny_calib_file)
    two.stages.append(llmprune.MagnitudeConfig(sparsity=0.5))
    with pytest.raises(llmprune.ConfigError, match="one prune stage"):
        llmprune.compress(str(tiny_model_dir), two, tmp_path / "x", device="cpu", progress=False, low_memory=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
