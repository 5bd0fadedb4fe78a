import json

import pytest
import torch
from helpers import TINY_VOCAB, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import read_metadata, save_checkpoint


def test_round_trip_plain_transformers(tmp_path):
    model = tiny_llama()
    llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), device="cpu", progress=False)
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", metadata={"x": 1})
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no llmprune involved
    ids = torch.randint(0, TINY_VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert read_metadata(out) == {"x": 1, "format": "dense"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_refuses_existing_output(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(LlmpruneError, match="already exists"):
        save_checkpoint(tiny_llama(), None, tmp_path / "ckpt", metadata={})


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "llmprune.json").write_text("{}")  # only llmprune's own outputs are replaced
    save_checkpoint(tiny_llama(), None, out, metadata={}, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, None, tmp_path / "ckpt", metadata={})
    assert list(tmp_path.iterdir()) == []


def test_unknown_format(tmp_path):
    with pytest.raises(LlmpruneError, match="unknown checkpoint format"):
        save_checkpoint(tiny_llama(), None, tmp_path / "c", metadata={}, format="nope")


def test_compress_api_records_metadata(tiny_model_dir, tiny_calib_file, tmp_path):
    recipe = llmprune.Recipe(
        stages=[llmprune.WandaConfig(sparsity="4:8")],
        calibration=llmprune.CalibConfig(source=str(tiny_calib_file), nsamples=4, seqlen=32),
    )
    res = llmprune.compress(str(tiny_model_dir), recipe, tmp_path / "out", device="cpu", progress=False)
    meta = json.loads((res.output / "llmprune.json").read_text())
    assert meta["llmprune_version"] == llmprune.__version__
    assert meta["recipe"]["prune"] == [{"method": "wanda", "sparsity": "4:8", "ignore": []}]
    assert meta["sparsity"]["overall"] == pytest.approx(0.5)
    assert len(meta["sparsity"]["modules"]) == 14
    assert meta["calibration"]["nsamples"] == 4
    # Reloads through the llmprune API as well.
    m = llmprune.load(res.output)
    assert (m.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() == pytest.approx(0.5)
