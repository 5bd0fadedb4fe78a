"""calibration.sequential: auto resolves to module (one pass) or layer (two passes), is recorded, and conflicts
are one-line errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_VOCAB, run_cli, tiny_llama, tiny_model, tiny_text, tiny_tokenizer

import llmprune
from llmprune.config import CalibConfig, Recipe, RecoveryConfig
from llmprune.engine import sequential as seq
from llmprune.errors import ConfigError

CPU = torch.device("cpu")
LLAMA = SimpleNamespace(hidden_size=64, intermediate_size=160)


def test_inflight_bytes_by_hand():
    # per token: max(2*64 + 160, 4*64) + 64 = 352 elements
    assert seq.inflight_bytes(LLAMA, tokens=10, dtype=torch.float32) == 10 * 352 * 4
    # OPT names: d_model / ffn_dim
    assert seq.inflight_bytes(SimpleNamespace(d_model=8, ffn_dim=4), tokens=1, dtype=torch.bfloat16) == (32 + 8) * 2


def test_resolution(monkeypatch):
    monkeypatch.setattr(seq, "memory_for", lambda device: 10 * 352 * 4)
    kw = dict(tokens=10, model_config=LLAMA, dtype=torch.float32, device=CPU)
    assert seq.resolve_sequential("auto", recover=None, **kw) == "module"
    assert seq.resolve_sequential("auto", recover=None, **{**kw, "tokens": 11}) == "layer"  # does not fit
    assert seq.resolve_sequential("auto", recover=RecoveryConfig(mode="block"), **kw) == "layer"
    assert seq.resolve_sequential("auto", recover=RecoveryConfig(mode="e2e"), **kw) == "module"  # after pruning
    assert seq.resolve_sequential("auto", recover=None, allowed=False, **kw) == "layer"
    assert seq.resolve_sequential("module", recover=None, **{**kw, "tokens": 10**9}) == "module"  # as asked
    assert seq.resolve_sequential("layer", recover=None, **kw) == "layer"
    with pytest.raises(ConfigError, match="sequential must be one of"):
        seq.resolve_sequential("sideways", recover=None, **kw)


def test_config_errors():
    with pytest.raises(ConfigError, match="calibration.sequential must be one of auto, module, layer"):
        CalibConfig(sequential="both")
    with pytest.raises(ConfigError, match="cannot be combined with block recovery"):
        Recipe(calibration=CalibConfig(sequential="module"), recover=RecoveryConfig(mode="block"))
    Recipe(calibration=CalibConfig(sequential="layer"), recover=RecoveryConfig(mode="block"))
    ids = torch.randint(0, TINY_VOCAB, (2, 8))
    with pytest.raises(ConfigError, match="cannot be combined with block recovery"):
        llmprune.prune(tiny_model("llama"), llmprune.WandaConfig(), ids, device="cpu", progress=False,
                       recover=RecoveryConfig(mode="block"), sequential="module")


def test_report_says_the_order_and_magnitude_needs_none():
    ids = torch.randint(0, TINY_VOCAB, (4, 8))
    assert llmprune.prune(tiny_model("llama"), llmprune.WandaConfig(), ids, device="cpu",
                          progress=False).sequential == "module"
    assert llmprune.prune(tiny_model("llama"), llmprune.WandaConfig(), ids, device="cpu", progress=False,
                          recover=RecoveryConfig(mode="block", steps=1)).sequential == "layer"
    assert llmprune.prune(tiny_model("llama"), llmprune.MagnitudeConfig(), device="cpu",
                          progress=False).sequential is None


def _model_and_calib(tmp_path, layers: int):
    """A saved tiny Llama with ``layers`` decoder layers and a calibration text file."""
    src = tmp_path / "model"
    tiny_llama(num_hidden_layers=layers).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(3000))
    return src, calib


@pytest.mark.parametrize("low_memory", [False, True])
def test_compress_records_the_resolved_order(tmp_path, low_memory):
    src, calib = _model_and_calib(tmp_path, layers=2)
    recipe = Recipe(stages=[llmprune.WandaConfig()], calibration=CalibConfig(source=str(calib), nsamples=4, seqlen=16))
    res = llmprune.compress(str(src), recipe, tmp_path / "out", device="cpu", progress=False, low_memory=low_memory)
    meta = json.loads((res.output / "llmprune.json").read_text())
    assert meta["calibration"]["sequential"] == "module"
    assert meta["recipe"]["calibration"]["sequential"] == "auto"  # as asked; the resolved order is beside it


def test_cli_flag(tmp_path, capsys):
    src, calib = _model_and_calib(tmp_path, layers=1)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", src, "--calib", calib, "--nsamples", 2, "--seqlen", 16, "--device",
                           "cpu", "--sequential", "layer", "--output", out)
    assert code == 0, err
    assert json.loads((out / "llmprune.json").read_text())["calibration"]["sequential"] == "layer"
    code, _, err = run_cli(capsys, "compress", src, "--calib", calib, "--sequential", "module", "--recover", "block",
                           "--device", "cpu", "--output", tmp_path / "o2")
    assert code == 2 and err.strip().startswith("llmprune: error:") and "block recovery" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()
    assert CalibConfig.SEQUENTIAL == ("auto", "module", "layer")  # the flag's choices
