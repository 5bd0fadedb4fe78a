"""Block recovery through compress: in-memory == streaming, resume, CLI flags, recipe key, metadata, card, packed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_checkpoint, checkpoint_tensors, run_cli, tiny_llama, tiny_tokenizer

import llmprune
from llmprune.config import CalibConfig, Recipe, RecoveryConfig
from llmprune.engine.streaming import SimulatedInterruption, StreamOptions, compress_streaming
from llmprune.errors import ConfigError
from llmprune.publish.modelcard import build_card
from llmprune.recipe import recipe_from_dict
from llmprune.runtime.sparse24.module import Sparse24Linear
from llmprune.sparsity import check_nm


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    tiny_llama(num_hidden_layers=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _recipe(calib, **rec):
    return Recipe(stages=[llmprune.WandaConfig(sparsity="2:4")],
                  calibration=CalibConfig(source=str(calib), nsamples=6, seqlen=16, batch_size=4),
                  recover=RecoveryConfig(steps=6, lr=1e-3, batch_size=2, **rec))


@pytest.mark.parametrize("mask", ["fixed", "learn"])
def test_streaming_identical_to_in_memory_and_metadata(tmp_path, model_dir, tiny_calib_file, mask):
    recipe = _recipe(tiny_calib_file, mask=mask)
    a = llmprune.compress(str(model_dir), recipe, tmp_path / "mem", device="cpu", progress=False, low_memory=False)
    b = llmprune.compress(str(model_dir), recipe, tmp_path / "stream", device="cpu", progress=False, low_memory=True)
    ta, tb = checkpoint_tensors(a.output), checkpoint_tensors(b.output)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    pruned = [k for k in ta if ".layers." in k and k.endswith("proj.weight")]
    assert pruned and all(check_nm(ta[k] != 0, 2, 4) and (ta[k] == 0).float().mean() == 0.5 for k in pruned)
    ma, mb = (json.loads((r.output / "llmprune.json").read_text()) for r in (a, b))
    assert ma["recovery"] == mb["recovery"] and ma["sparsity"] == mb["sparsity"]
    blocks = ma["recovery"]["blocks"]
    assert [b["layer"] for b in blocks] == [0, 1, 2] and all(b["attn"]["steps"] == 6 for b in blocks)
    assert ma["recipe"]["recover"]["mask"] == mask
    card = build_card(a.output)
    assert "## Recovery" in card and "| 0 | attn | 6 |" in card


def test_resume_mid_recovery_gives_the_same_checkpoint(tmp_path, model_dir, tiny_calib_file):
    recipe = _recipe(tiny_calib_file)
    cpu = torch.device("cpu")
    ref = compress_streaming(None, model_dir, recipe, tmp_path / "ref", device=cpu, progress=False)
    out = tmp_path / "out"
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, model_dir, recipe, out, device=cpu, progress=False, options=StreamOptions(stop_after=1))
    res = compress_streaming(None, model_dir, recipe, out, device=cpu, progress=False,
                             options=StreamOptions(resume=True))
    assert_same_checkpoint(ref.output, out)
    assert [m.recovery["loss_after"] for m in res.report.modules] == [m.recovery["loss_after"] for m in ref.report.modules]


def test_cli_flags_recipe_key_and_packed(tmp_path, capsys, model_dir, tiny_calib_file):
    out = tmp_path / "cli"
    code, stdout, _ = run_cli(capsys, "compress", str(model_dir), "--method", "sparsegpt", "--sparsity", "2:4",
                              "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "16", "--device", "cpu",
                              "--recover", "block", "--recover-steps", "3", "--recover-lr", "1e-3",
                              "--recover-scope", "whole", "--recover-loss", "token", "--format", "packed", "-o", str(out),
                              "-q")
    assert code == 0, stdout
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["recipe"]["recover"]["steps"] == 3 and meta["recipe"]["recover"]["scope"] == "whole"
    assert meta["recipe"]["recover"]["loss"] == "token"
    assert meta["recipe"]["save"]["format"] == "packed"
    assert {"layer", "block"} == set(meta["recovery"]["blocks"][0])
    model = llmprune.load(str(out))
    assert any(isinstance(m, Sparse24Linear) for m in model.modules())  # packed 2:4 after recovery
    assert model(torch.randint(3, 64, (1, 8))).logits.isfinite().all()
    code, _, err = run_cli(capsys, "compress", str(model_dir), "--recover-lr", "1e-3", "-o", str(tmp_path / "x"))
    assert code == 2 and "--recover-lr needs --recover" in err
    code, _, err = run_cli(capsys, "compress", str(model_dir), "--method", "cfsp", "--sparsity", "0.3", "--recover", "block",
                           "-o", str(tmp_path / "y"))
    assert code == 2 and "per-linear" in err
    r = recipe_from_dict({"prune": [{"method": "wanda", "sparsity": "2:4"}], "recover": {"steps": 5, "mask": "learn"}})
    assert r.recover.steps == 5 and r.to_dict()["recover"]["mask"] == "learn"
    with pytest.raises(ConfigError, match="recover.mode"):
        recipe_from_dict({"prune": [{"method": "wanda"}], "recover": {"mode": "lora"}})
    assert "recover" not in Recipe(stages=[llmprune.WandaConfig()]).to_dict()


def test_cli_block_then_e2e(tmp_path, capsys, model_dir, tiny_calib_file):
    out = tmp_path / "both"
    code, stdout, _ = run_cli(capsys, "compress", str(model_dir), "--method", "wanda", "--sparsity", "2:4",
                              "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "16", "--device", "cpu",
                              "--recover", "block+e2e", "--recover-steps", "2", "--recover-distill-steps", "3",
                              "--recover-distill-lr", "1e-3", "-o", str(out), "-q")
    assert code == 0, stdout
    meta = json.loads((out / "llmprune.json").read_text())
    rec = meta["recipe"]["recover"]
    assert (rec["mode"], rec["steps"], rec["distill_steps"], rec["distill_lr"]) == ("block+e2e", 2, 3, 1e-3)
    assert meta["recovery"]["e2e"]["steps"] == 3 and {"layer", "attn", "mlp"} == set(meta["recovery"]["blocks"][0])
    assert meta["recovery"]["e2e"]["sequences"] == 4  # the calibration set
    card = build_card(out)
    assert "End-to-end distillation from the dense model: 3 steps on 4 sequences" in card
    assert "Block-wise reconstruction" in card
    code, _, err = run_cli(capsys, "compress", str(model_dir), "--recover", "e2e", "--recover-distill-steps", "3",
                           "-o", str(tmp_path / "z"))
    assert code == 2 and "distill_steps" in err and not (tmp_path / "z").exists()


def test_distillation_on_more_sequences_than_the_calibration_set(tmp_path, capsys, model_dir, tiny_calib_file):
    """--recover-distill-nsamples 7 with 4 calibration sequences: the distillation trains on the 4 and 3 more drawn
    with the next seed (recorded in the recipe, llmprune.json and the card); fewer takes the first n."""
    from llmprune.calibration.data import extend_calibration, load_calibration
    from llmprune.model.loading import load_tokenizer

    out = tmp_path / "more"
    code, stdout, _ = run_cli(capsys, "compress", str(model_dir), "--method", "wanda", "--sparsity", "2:4",
                              "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "16", "--device", "cpu",
                              "--recover", "e2e", "--recover-steps", "2", "--recover-distill-nsamples", "7",
                              "-o", str(out), "-q")
    assert code == 0, stdout
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["recipe"]["recover"]["distill_nsamples"] == 7 and meta["recovery"]["e2e"]["sequences"] == 7
    assert "2 steps on 7 sequences" in build_card(out)
    tok = load_tokenizer(str(model_dir))
    cfg = CalibConfig(source=str(tiny_calib_file), nsamples=4, seqlen=16, seed=0)
    ids = load_calibration(cfg, tok, progress=False)
    more = extend_calibration(ids, cfg, 7, tok)
    extra = load_calibration(CalibConfig(source=str(tiny_calib_file), nsamples=3, seqlen=16, seed=1), tok,
                             progress=False)
    assert torch.equal(more, torch.cat([ids, extra])) and torch.equal(extend_calibration(ids, cfg, 2, tok), ids[:2])
    with pytest.raises(ConfigError, match="distill_nsamples belongs to mode e2e"):
        RecoveryConfig(mode="block", distill_nsamples=8)
    with pytest.raises(ConfigError, match="distill_nsamples"):
        RecoveryConfig(mode="e2e", distill_nsamples=0)
    model = llmprune.load(str(model_dir))
    with pytest.raises(ConfigError, match="exceeds the 4 calibration sequences"):
        llmprune.compress(model, Recipe(stages=[llmprune.WandaConfig(sparsity="2:4")],
                                        recover=RecoveryConfig(mode="e2e", steps=1, distill_nsamples=5)),
                          calib=ids)
