"""`llmprune bench`: rows for the model and its dense baseline, CPU notice, results stored with the checkpoint."""

import json

import pytest
import torch
from helpers import run_cli, tiny_llama

from llmprune.evaluate import lm_eval as evaluation
from llmprune.evaluate.bench import PeakMemory, checkpoint_bytes, time_generation

FAST = ["--prompt-len", 8, "--new-tokens", 2, "--repeats", 1, "--batch-size", 2, "--device", "cpu"]


def test_bench_with_baseline_records(checkpoint, tiny_model_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "bench", checkpoint, *FAST, "--json", tmp_path / "b.json", "-q")
    assert code == 0, err
    assert "CPU run: torch reference paths" in out
    assert "batch 1: model vs baseline" in out and "batch 2: model vs baseline" in out
    res = json.loads((tmp_path / "b.json").read_text())
    assert [(r["label"], r["batch"]) for r in res["rows"]] == [("model", 1), ("model", 2), ("baseline", 1), ("baseline", 2)]
    for r in res["rows"]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_mem_bytes"] >= 0
        assert r["checkpoint_bytes"] > 0
    assert res["rows"][2]["model"] == str(tiny_model_dir)
    stored = json.loads((checkpoint / "eval_results.json").read_text())
    assert stored["bench"]["rows"] == res["rows"] and stored["bench"]["cpu"] is True


def test_bench_plain_model_no_baseline(tiny_model_dir, capsys):
    code, out, err = run_cli(capsys, "bench", tiny_model_dir, *FAST, "--batch-size", 1, "--baseline", "none", "-q")
    assert code == 0, err
    assert "model vs baseline" not in out and not (tiny_model_dir / "eval_results.json").exists()


def test_bench_feature_unavailable_is_an_error(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "feature_available", lambda option: False)
    code, _, err = run_cli(capsys, "bench", checkpoint, *FAST, "--attn-sparsity", "0.5", "-q")
    assert code == 2 and "--attn-sparsity needs llmprune.runtime.gates.gate" in err


def test_bench_bad_flags(checkpoint, capsys):
    code, _, err = run_cli(capsys, "bench", checkpoint, "--batch-size", 0)
    assert code == 2 and "--batch-size" in err


def test_runtime_hook_receives_value_and_cache_factory(monkeypatch):
    """A feature plugs in through RUNTIME_FEATURES: setup(model, value) -> past_key_values factory."""
    from transformers import DynamicCache

    seen = []

    def setup(model, value, options):
        seen.append(value)
        return lambda batch: DynamicCache()

    feat = evaluation.RUNTIME_FEATURES["kv_sparsity"]
    monkeypatch.setitem(evaluation.RUNTIME_FEATURES, "kv_sparsity",
                        evaluation.RuntimeFeature(feat.option, feat.flag, feat.module, feat.issue, setup, feat.label))
    monkeypatch.setattr(evaluation, "feature_available", lambda option: True)
    model = tiny_llama()
    rs = evaluation.setup_runtime(model, {"kv_sparsity": 0.5})
    assert seen == [0.5] and rs.options == {"kv_sparsity": 0.5} and "50%" in rs.features[0]
    pre, dec = time_generation(model, 1, 8, 2, past_key_values=rs.past_key_values, repeats=1)
    assert pre > 0 and dec > 0
    with pytest.raises(evaluation.ConfigError, match="must be in"):
        evaluation.setup_runtime(model, {"kv_sparsity": 1.5})


def test_peak_memory_and_bytes(tiny_model_dir):
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64, 2**20 // 4)  # 64 MiB
        del x
    assert mem.peak >= 0
    assert checkpoint_bytes(str(tiny_model_dir)) == sum(
        f.stat().st_size for f in tiny_model_dir.iterdir() if f.suffix == ".safetensors")
    assert checkpoint_bytes("org/not-local") is None
