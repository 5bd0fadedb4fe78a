"""`llmprune bench`: rows for the model and its dense baseline, CPU notice, results stored with the checkpoint."""

import json

import pytest
import torch
from helpers import run_cli, tiny_llama

from llmprune.config import RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.evaluate.bench import PeakMemory, checkpoint_bytes, time_generation
from llmprune.runtime import options

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


def test_bench_attn_sparsity_needs_gates(checkpoint, capsys):
    code, _, err = run_cli(capsys, "bench", checkpoint, *FAST, "--attn-sparsity", "0.5", "-q")
    assert code == 2 and "--attn-sparsity needs attention gates" in err


def _record_runtime(checkpoint, runtime: dict) -> None:
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    meta["recipe"]["runtime"] = runtime
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))


def test_bench_honours_checkpoint_runtime_and_flags(checkpoint, tmp_path, capsys):
    """The checkpoint's recorded runtime section applies; a KV flag replaces the recorded KV settings."""
    _record_runtime(checkpoint, {"kv_sparsity": 0.5, "kv_window": 16})
    argv = ["bench", checkpoint, *FAST, "--batch-size", 1, "--baseline", "none", "--no-record", "-q"]
    code, _, err = run_cli(capsys, *argv, "--json", tmp_path / "a.json")
    assert code == 0, err
    row = json.loads((tmp_path / "a.json").read_text())["rows"][0]
    assert row["runtime"] == {"kv_sparsity": 0.5, "kv_window": 16}
    assert "KV bitmap cache, 50% of K/V pruned, window 16" in row["features"]
    code, _, err = run_cli(capsys, *argv, "--k-sparsity", 0.25, "--v-sparsity", 0.5, "--json", tmp_path / "b.json")
    assert code == 0, err
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["runtime"] == {"kv_k_sparsity": 0.25, "kv_v_sparsity": 0.5}
    assert "KV bitmap cache, K 25% / V 50% pruned, window 32" in row["features"]


def test_bench_bad_flags(checkpoint, capsys):
    code, _, err = run_cli(capsys, "bench", checkpoint, "--batch-size", 0)
    assert code == 2 and "--batch-size" in err


def test_runtime_hook_receives_config_and_cache_factory(monkeypatch):
    """A feature plugs in through RUNTIME_FEATURES: setup(model, config) -> past_key_values factory."""
    from transformers import DynamicCache

    seen = []

    def setup(model, config):
        seen.append(config.kv_sparsity)
        return lambda batch: DynamicCache()

    feat = options.RUNTIME_FEATURES["kv_sparsity"]
    monkeypatch.setitem(options.RUNTIME_FEATURES, "kv_sparsity",
                        options.RuntimeFeature(feat.option, feat.fields, setup, feat.label))
    model = tiny_llama()
    rs = options.setup_runtime(model, RuntimeConfig(kv_sparsity=0.5))
    assert seen == [0.5] and rs.options == {"kv_sparsity": 0.5} and "50%" in rs.features[0]
    assert options.runtime_setup(model) is rs
    pre, dec = time_generation(model, 1, 8, 2, past_key_values=rs.past_key_values, repeats=1)
    assert pre > 0 and dec > 0
    with pytest.raises(ConfigError, match="must be in"):
        RuntimeConfig(kv_sparsity=1.5)


def test_peak_memory_and_bytes(tiny_model_dir):
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64, 2**20 // 4)  # 64 MiB
        del x
    assert mem.peak >= 0
    assert checkpoint_bytes(str(tiny_model_dir)) == sum(
        f.stat().st_size for f in tiny_model_dir.iterdir() if f.suffix == ".safetensors")
    assert checkpoint_bytes("org/not-local") is None
