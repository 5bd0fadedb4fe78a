"""Issue 19: the baseline in the model's dtype (bug 5), the KV-sparsity note of eval (bug 8), recorded sources and
base model (bug 4), ``llmprune info``, one ``--json [FILE]`` spelling and ``compress --dry-run``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_cli

import llmprune
from llmprune.commands.bench import _baseline

FAST = ["--prompt-len", 8, "--new-tokens", 2, "--repeats", 1, "--batch-size", 1, "--device", "cpu", "-q"]


@pytest.fixture
def bf16_checkpoint(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--sparsity", "2:4",
                           "--dtype", "bfloat16", "-o", tmp_path / "bf16", "--device", "cpu", "-q")
    assert code == 0, err
    return tmp_path / "bf16"


def test_bench_baseline_runs_in_the_model_dtype(bf16_checkpoint, capsys):
    code, out, err = run_cli(capsys, "bench", bf16_checkpoint, *FAST, "--json", "--no-record")
    assert code == 0, err
    res = json.loads(out)  # --json alone: the document on stdout, the text on stderr
    assert "model vs baseline" in err
    assert res["model_dtype"] == res["baseline_dtype"] == "bfloat16"
    assert {r["dtype"] for r in res["rows"]} == {"bfloat16"}  # the fp32 base model ran in bf16
    assert "loaded bytes (bfloat16 vs bfloat16)" in err
    code, out, err = run_cli(capsys, "bench", bf16_checkpoint, *FAST, "--json", "--no-record",
                             "--baseline-dtype", "float32")
    rows = json.loads(out)["rows"]
    assert [r["dtype"] for r in rows] == ["bfloat16", "float32"]


def test_eval_says_kv_sparsity_leaves_loglikelihood_scores(checkpoint, monkeypatch, capsys):
    import llmprune.evaluate.lm_eval as lm

    seen = []
    monkeypatch.setattr(lm, "evaluate", lambda model, tok, tasks, **kw: seen.append(model) or {"results": {}})
    monkeypatch.setattr(lm, "format_table", lambda results: "(table)")
    code, out, err = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--kv-sparsity", "0.5", "--no-record",
                             "--device", "cpu", "-q")
    assert code == 0, err
    assert "loglikelihood tasks" in out and "unaffected" in out
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--no-record", "--device", "cpu", "-q")
    assert "unaffected" not in out and len(seen) == 2


def test_calibration_source_records_what_auto_resolved_to(tiny_model_dir, tmp_path, capsys):
    # offline (conftest): auto -> self, sampled from the model
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "wanda", "--nsamples", 2, "--seqlen", 8,
                           "-o", tmp_path / "w", "--device", "cpu", "-q")
    assert code == 0, err
    meta = json.loads((tmp_path / "w" / "llmprune.json").read_text())
    assert meta["calibration"]["source"] == "self"
    assert meta["recipe"]["calibration"]["source"] == "auto"  # the recipe as given


def test_relative_base_model_resolves_from_another_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)
    code, _, err = run_cli(capsys, "compress", "./tiny-llama", "--method", "magnitude", "-o", "out/ck",
                           "--device", "cpu", "-q")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ck = tmp_path / "out" / "ck"
    assert _baseline(str(ck), "auto") == str(tiny_model_dir.resolve())
    assert llmprune.evaluate.inspect.inspect_checkpoint(ck, sparsity=False)["base_model"] == str(tiny_model_dir)


def test_info_measures_the_weights(checkpoint, tmp_path, capsys):
    code, out, err = run_cli(capsys, "info", checkpoint, "--json", tmp_path / "i.json")
    assert code == 0, err
    assert "2:4 valid in 14/14" in out and "dense checkpoint" in out
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["format"] == "dense" and info["dtype"] == "float32"
    w = llmprune.load(checkpoint)
    assert info["parameters"] == sum(p.numel() for p in w.parameters())
    mods = info["sparsity"]["modules"]
    assert len(mods) == 14 and all(m["2:4"] and m["sparsity"] == 0.5 for m in mods.values())
    assert info["bytes"]["weights"] == (checkpoint / "model.safetensors").stat().st_size
    # a weight broken by hand is reported, not trusted from llmprune.json
    from safetensors.torch import load_file, save_file

    sd = load_file(checkpoint / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.ones_like(sd["model.layers.0.mlp.up_proj.weight"])
    save_file(sd, checkpoint / "model.safetensors", metadata={"format": "pt"})
    info = llmprune.evaluate.inspect.inspect_checkpoint(checkpoint)
    assert info["sparsity"]["summary"]["2:4_valid"] == "13/14"
    assert info["sparsity"]["modules"]["model.layers.0.mlp.up_proj"] == {"shape": [128, 64], "sparsity": 0.0,
                                                                        "packed": False, "2:4": False}


def test_dry_run_plans_without_writing(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "never"
    code, out, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "sparsegpt", "--nsamples", 4,
                             "--seqlen", 512, "-o", out_dir, "--dry-run", "--json", "--device", "cpu", "-q")
    assert code == 0, err
    plan = json.loads(out)
    assert not out_dir.exists()
    assert plan["calibration_source"] == "auto -> self" and plan["engine"] == "in-memory"
    assert plan["resolved_model"] == str(tiny_model_dir)
    est = plan["estimate"]
    assert est["calibration_seqlen"] == 256  # clipped to the model's context
    assert est["activation_bytes"] == 2 * 4 * 256 * 64 * 4
    assert est["statistics_bytes"] == 4 * (6 * 64 * 64 + 128 * 128)  # fp32 Hessians: q/k/v/o, gate, up (in 64); down
    assert est["time_lower_bound_s"] >= 0 and "nothing was pruned" in err
    # what a real run refuses, the dry run refuses too
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "-o", tmp_path / "taken", "--dry-run", "-q")
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("command", ["ppl", "eval", "bench", "convert", "info", "compress", "train-gates"])
def test_one_json_spelling(command):
    from llmprune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    flag = next(a for a in sub._actions if "--json" in a.option_strings)
    assert flag.nargs == "?" and flag.const == "-" and flag.dest == "json"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
