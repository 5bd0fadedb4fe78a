"""Packed 2:4 checkpoints refuse to load in plain transformers and round-trip through save_pretrained (issue 19,
bug 1)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import run_cli

import llmprune
from llmprune.runtime.sparse24 import Sparse24Linear

IDS = torch.tensor([[1, 5, 9, 17, 33, 65]])


def _packed(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", checkpoint, "--format", "packed", "-o", tmp_path / "packed")
    assert code == 0, err
    return tmp_path / "packed"


def test_packed_config_names_a_type_plain_transformers_cannot_resolve(checkpoint, tmp_path, capsys):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    packed = _packed(checkpoint, tmp_path, capsys)
    cfg = json.loads((packed / "config.json").read_text())
    assert cfg["model_type"] == "llmprune_llama" and cfg["architectures"] == ["LlmpruneLlamaForCausalLM"]
    assert cfg["model_type"] not in CONFIG_MAPPING_NAMES  # transformers' own types
    assert cfg["quantization_config"]["quant_method"] == "llmprune_sparse24"
    # without `import llmprune`: an error, not a model with random linears
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({str(packed)!r})\n"
            "except ValueError as e:\n    print('REFUSED', e)\n    sys.exit(0)\nsys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout and "llmprune_llama" in proc.stdout


def test_loaded_packed_model_save_pretrained_round_trips(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    packed = _packed(checkpoint, tmp_path, capsys)
    ref = llmprune.load(checkpoint)(IDS).logits
    for name, model in (("via-llmprune", llmprune.load(packed)),
                        ("via-transformers", AutoModelForCausalLM.from_pretrained(packed))):
        assert isinstance(model.model.layers[0].mlp.up_proj, Sparse24Linear)
        model.save_pretrained(tmp_path / name)
        again = llmprune.load(tmp_path / name)
        assert isinstance(again.model.layers[0].mlp.up_proj, Sparse24Linear), name
        torch.testing.assert_close(again(IDS).logits, ref, rtol=0, atol=0)
        assert json.loads((tmp_path / name / "config.json").read_text())["model_type"] == "llmprune_llama"


def test_convert_back_to_dense_is_plain_llama(checkpoint, tmp_path, capsys):
    packed = _packed(checkpoint, tmp_path, capsys)
    code, _, err = run_cli(capsys, "convert", packed, "--format", "dense", "-o", tmp_path / "dense")
    assert code == 0, err
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    meta = json.loads((tmp_path / "dense" / "llmprune.json").read_text())
    assert meta["converted_from"] == "packed" and meta["format"] == "dense"
