"""``llmprune.json`` records no absolute local path (user name, directory layout) unless asked to, and readers
resolve its base model against the checkpoint directory, so eval --baseline and bench work from any cwd."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli

import llmprune
from llmprune.commands.eval import baseline_ref
from llmprune.config import CalibConfig, Recipe
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.metadata import build_metadata, portable_command, record_path, resolve_base_model
from llmprune.prune.report import PruneReport


def _compress(capsys, monkeypatch, *argv):
    """Run ``llmprune compress ARGV`` with ``sys.argv`` set as a shell would (what gets recorded)."""
    argv = ["compress", *[str(a) for a in argv]]
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/llmprune", *argv])
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    return out


def _private(text: str, tmp_path: Path) -> None:
    assert str(tmp_path) not in text
    assert str(Path.home()) not in text
    assert str(tmp_path.resolve()) not in text


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_no_absolute_paths_in_metadata(tiny_model_dir, tiny_calib_file, tmp_path, capsys, monkeypatch, streaming):
    out = tmp_path / "runs" / "ckpt"
    _compress(capsys, monkeypatch, tiny_model_dir, "--method", "wanda", "--calib", tiny_calib_file, "--nsamples", 4,
              "--seqlen", 16, "--device", "cpu", "-q", "-o", out, "--low-memory" if streaming else "--no-low-memory")
    text = (out / "llmprune.json").read_text()
    _private(text, tmp_path)
    meta = json.loads(text)
    assert meta["paths"] == "relative"
    assert meta["base_model"] == "../../tiny-llama"
    assert meta["calibration"]["source"] == "../../calib.txt" == meta["recipe"]["calibration"]["source"]
    cmd = shlex.split(meta["command"])
    assert cmd[:3] == ["llmprune", "compress", "../../tiny-llama"]
    assert cmd[cmd.index("--calib") + 1] == "../../calib.txt" and cmd[cmd.index("-o") + 1] == "."
    # every recorded path resolves from the checkpoint directory, whatever the cwd
    assert (out / meta["base_model"]).resolve() == tiny_model_dir.resolve()
    assert (out / meta["calibration"]["source"]).resolve() == tiny_calib_file.resolve()
    assert resolve_base_model(out, meta) == str(tiny_model_dir.resolve())


def test_relative_arguments_from_the_cwd(tiny_model_dir, tiny_calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _compress(capsys, monkeypatch, "tiny-llama", "--method", "magnitude", "--device", "cpu", "-q",
              "--output=deep/er/ckpt", "--offload-dir", "off")
    meta = json.loads((tmp_path / "deep/er/ckpt/llmprune.json").read_text())
    assert meta["base_model"] == "../../../tiny-llama"
    cmd = shlex.split(meta["command"])
    assert "--output=." in cmd and cmd[cmd.index("--offload-dir") + 1] == "../../../off"
    _private(json.dumps(meta), tmp_path)


def test_record_paths_absolute(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    _compress(capsys, monkeypatch, tiny_model_dir, "--method", "magnitude", "--device", "cpu", "-q", "-o", out,
              "--record-paths", "absolute")
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["paths"] == "absolute"
    assert meta["base_model"] == str(tiny_model_dir.resolve())
    assert str(out.resolve()) in shlex.split(meta["command"])
    assert resolve_base_model(out, meta) == str(tiny_model_dir.resolve())


def test_api_record_paths_and_argv_fallback(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "venv" / "bin" / "myscript.py"), str(tiny_model_dir)])
    res = llmprune.compress(str(tiny_model_dir), Recipe(stages=[llmprune.MagnitudeConfig(sparsity=0.5)]),
                            tmp_path / "a", device="cpu", progress=False)
    assert res.metadata["command"] == "myscript.py ../tiny-llama"  # the program by its name
    _private((tmp_path / "a" / "llmprune.json").read_text(), tmp_path)
    res = llmprune.compress(str(tiny_model_dir), Recipe(stages=[llmprune.MagnitudeConfig(sparsity=0.5)]),
                            tmp_path / "b", device="cpu", progress=False, record_paths="absolute")
    assert res.metadata["base_model"] == str(tiny_model_dir.resolve())
    with pytest.raises(ConfigError, match="record_paths must be one of"):
        llmprune.compress(str(tiny_model_dir), Recipe(stages=[llmprune.MagnitudeConfig(sparsity=0.5)]),
                          tmp_path / "c", device="cpu", progress=False, record_paths="hidden")
    assert not (tmp_path / "c").exists()


def _meta(base, output, **kw):
    return build_metadata(base_model=base, recipe=Recipe(stages=[llmprune.MagnitudeConfig()]), calibration=None,
                          report=PruneReport(), dtype=torch.float32, command="llmprune compress x", output=output, **kw)


def test_hub_ids_and_aliases_are_recorded_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()  # a local directory named like the alias: the alias wins, as when loading
    assert _meta("smollm2-135m", tmp_path / "o", base_is_path=False)["base_model"] == "smollm2-135m"
    assert _meta("HuggingFaceTB/SmolLM2-135M", tmp_path / "o")["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    cal = build_metadata(base_model="org/x", recipe=Recipe(stages=[llmprune.MagnitudeConfig()]),
                         calibration=CalibConfig(source="c4"), report=PruneReport(), dtype=torch.float32,
                         command="llmprune compress org/x --calib c4 --sparsity 2:4", output=tmp_path / "o")
    assert cal["calibration"]["source"] == "c4"
    assert cal["command"] == "llmprune compress org/x --calib c4 --sparsity 2:4"


def test_portable_command_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my model").mkdir()
    out = tmp_path / "o"
    cmd = portable_command(shlex.join(["/opt/bin/llmprune", "compress", "my model", "--calib=/data/c.txt", "-o",
                                       str(out), "--sparsity", "2:4", "--recipe", "r.yaml", "~/x"]), out)
    assert shlex.split(cmd) == ["llmprune", "compress", "../my model", f"--calib={record_path('/data/c.txt', out)}",
                                "-o", ".", "--sparsity", "2:4", "--recipe", "../r.yaml", record_path("~/x", out)]
    assert portable_command("llmprune 'unbalanced", out).startswith("llmprune")  # never a traceback
    assert str(tmp_path) not in cmd and "~" not in cmd


def test_resolve_base_model_cases(tmp_path, tiny_model_dir, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    elsewhere = tmp_path / "x" / "y"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # ../tiny-llama from here does not exist
    rel = {"base_model": "../tiny-llama", "paths": "relative"}
    assert resolve_base_model(ckpt, rel) == str(tiny_model_dir.resolve())
    assert resolve_base_model(Path("../../ckpt"), rel) == str(tiny_model_dir.resolve())  # a relative checkpoint dir
    assert resolve_base_model(ckpt, {"base_model": "org/name", "paths": "relative"}) == "org/name"
    assert resolve_base_model(ckpt, {"base_model": "smollm2-135m", "paths": "relative"}) == "smollm2-135m"
    assert resolve_base_model(ckpt, {"base_model": "/abs/model", "paths": "absolute"}) == "/abs/model"
    assert resolve_base_model(ckpt, {"base_model": "old/relative"}) == "old/relative"  # files before this change
    for bad in ({}, {"base_model": ""}, {"base_model": 3}):
        with pytest.raises(LlmpruneError, match="records no base_model"):
            resolve_base_model(ckpt, bad)


def test_eval_baseline_resolves_from_another_cwd(checkpoint, tiny_model_dir, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert json.loads((checkpoint / "llmprune.json").read_text())["base_model"] == "../tiny-llama"
    assert baseline_ref(str(checkpoint), "auto") == str(tiny_model_dir.resolve())
    data = tmp_path / "data"
    data.mkdir()
    doc = {"query": "Question: w1 w2 w3?", "choices": ["w4 w5", "w6", "w7 w8 w9"], "gold": 1}
    (data / "copa.jsonl").write_text("".join(json.dumps(doc) + "\n" for _ in range(2)))
    code, out, err = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--limit", 2, "--data-dir", data,
                             "--device", "cpu", "--baseline", "-q")
    assert code == 0, err
    assert "baseline" in out
    stored = json.loads((checkpoint / "eval_results.json").read_text())
    assert "copa" in stored["baseline"]["lm_eval"]


def test_bench_baseline_resolves_from_another_cwd(checkpoint, tiny_model_dir, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "bench", checkpoint, "--prompt-len", 8, "--new-tokens", 2, "--repeats", 1,
                             "--batch-size", 2, "--device", "cpu", "--json", tmp_path / "b.json", "-q")
    assert code == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["model", "model", "baseline", "baseline"]
    assert rows[2]["model"] == str(tiny_model_dir.resolve())
