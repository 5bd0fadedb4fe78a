"""Resumable compress: an interrupted run continued with --resume gives the identical checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_checkpoint, checkpoint_tensors, tiny_llama, tiny_tokenizer

import llmprune
from llmprune.cli import main
from llmprune.config import CalibConfig, Recipe
from llmprune.engine.streaming import SimulatedInterruption, StreamOptions, compress_streaming
from llmprune.engine.workdir import STATE_FILE
from llmprune.formats.shards import ShardWriter


@pytest.fixture
def deep_model_dir(tmp_path):
    d = tmp_path / "model"
    tiny_llama(num_hidden_layers=4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("cfg", [llmprune.WandaConfig(sparsity="2:4")], ids=["wanda"])
def test_resume_after_interruption_is_identical(tmp_path, deep_model_dir, tiny_calib_file, cfg):
    recipe = Recipe(stages=[cfg], calibration=CalibConfig(source=str(tiny_calib_file), nsamples=6, seqlen=16,
                                                          batch_size=4))
    cpu = torch.device("cpu")
    ref = compress_streaming(None, deep_model_dir, recipe, tmp_path / "ref", device=cpu, progress=False)
    out = tmp_path / "out"
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, deep_model_dir, recipe, out, device=cpu, progress=False,
                           options=StreamOptions(stop_after=2))
    partial = tmp_path / "out.partial"
    state = json.loads((partial / STATE_FILE).read_text())
    assert state["next_layer"] == 2 and not out.exists()
    # Output is written incrementally: layers 0-1 are final in the partial shards, layers 2-3 not written yet.
    part, final = checkpoint_tensors(partial / "ckpt"), checkpoint_tensors(ref.output)
    assert torch.equal(part["model.layers.1.mlp.down_proj.weight"], final["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(part["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    assert not part["model.layers.2.mlp.down_proj.weight"].any()
    with pytest.raises(llmprune.LlmpruneError, match="--resume"):
        compress_streaming(None, deep_model_dir, recipe, out, device=cpu, progress=False)
    res = compress_streaming(None, deep_model_dir, recipe, out, device=cpu, progress=False,
                             options=StreamOptions(resume=True))
    assert res.output == out and not partial.exists()
    assert_same_checkpoint(ref.output, out)
    assert [m.name for m in res.report.modules] == [m.name for m in ref.report.modules]


def test_resume_without_calibration(tmp_path, deep_model_dir):
    recipe = Recipe(stages=[llmprune.MagnitudeConfig(sparsity=0.5)])
    cpu = torch.device("cpu")
    ref = compress_streaming(None, deep_model_dir, recipe, tmp_path / "ref", device=cpu, progress=False)
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, deep_model_dir, recipe, tmp_path / "out", device=cpu, progress=False,
                           options=StreamOptions(stop_after=1))
    res = compress_streaming(None, deep_model_dir, recipe, tmp_path / "out", device=cpu, progress=False,
                             options=StreamOptions(resume=True))
    assert res.metadata["calibration"] is None
    assert_same_checkpoint(ref.output, res.output)


def test_crash_mid_layer_then_cli_resume(tmp_path, deep_model_dir, tiny_calib_file, monkeypatch, capsys):
    """A crash after a layer's tensors were written but before its state commit redoes that layer."""
    common = ["compress", str(deep_model_dir), "--method", "wanda", "--calib", str(tiny_calib_file), "--nsamples",
              "6", "--seqlen", "16", "--batch-size", "4", "--device", "cpu", "-q"]
    assert main([*common, "-o", str(tmp_path / "ref"), "--low-memory"]) == 0
    calls = {"n": 0}
    flush = ShardWriter.flush

    def crashing_flush(self):
        flush(self)
        calls["n"] += 1
        if calls["n"] == 3:  # 1: embeddings, 2: layer 0, 3: layer 1 written, not yet committed
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "flush", crashing_flush)
    assert main([*common, "-o", str(tmp_path / "out"), "--low-memory"]) == 130
    assert json.loads((tmp_path / "out.partial" / STATE_FILE).read_text())["next_layer"] == 1
    monkeypatch.setattr(ShardWriter, "flush", flush)
    assert main([*common, "-o", str(tmp_path / "out"), "--resume"]) == 0
    assert_same_checkpoint(tmp_path / "ref", tmp_path / "out")
    assert "saved dense checkpoint" in capsys.readouterr().out
