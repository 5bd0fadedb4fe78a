"""On the CPU, ``ppl`` / ``eval`` / ``generate`` with ``--dtype auto`` run a 16-bit checkpoint in float32."""

import pytest
import torch
from helpers import run_cli, tiny_llama, tiny_text, tiny_tokenizer

import llmprune.runtime.load as load_mod
from llmprune.runtime.flags import runtime_dtype


def test_auto_means_float32_on_the_cpu_only():
    cpu = torch.device("cpu")
    assert runtime_dtype("auto", cpu) == "float32" and runtime_dtype(None, cpu) == "float32"
    assert runtime_dtype("bfloat16", cpu) == "bfloat16" and runtime_dtype(torch.float16, cpu) is torch.float16
    assert runtime_dtype("auto", torch.device("cuda")) == "auto"  # a device object only: no GPU needed


@pytest.fixture
def bf16_dir(tmp_path):
    d = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def loaded(monkeypatch):
    dtypes = []
    real = load_mod.load_model

    def spy(*a, **kw):
        model = real(*a, **kw)
        dtypes.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(load_mod, "load_model", spy)
    return dtypes


@pytest.mark.parametrize("flag, expected", [([], torch.float32), (["--dtype", "bfloat16"], torch.bfloat16)])
def test_ppl_and_generate_compute_in_float32_on_cpu_by_default(bf16_dir, tmp_path, loaded, capsys, flag, expected):
    text = tmp_path / "wiki.txt"
    text.write_text(tiny_text(400))
    code, out, err = run_cli(capsys, "ppl", bf16_dir, "--data-path", text, "--seqlen", 16, "--max-windows", 2,
                             "--device", "cpu", "-q", *flag)
    assert code == 0, err
    code, out, err = run_cli(capsys, "generate", bf16_dir, "--prompt", "the", "--max-new-tokens", 2,
                             "--device", "cpu", "-q", *flag)
    assert code == 0, err
    assert loaded == [expected, expected]


def test_eval_runs_float32_on_cpu_and_says_so(bf16_dir, loaded, monkeypatch, capsys):
    import llmprune.evaluate.lm_eval as lm

    monkeypatch.setattr(lm, "evaluate", lambda model, tok, tasks, **kw: {"results": {}})
    monkeypatch.setattr(lm, "format_table", lambda results: "(table)")
    code, out, err = run_cli(capsys, "eval", bf16_dir, "--tasks", "copa", "--no-record", "--device", "cpu", "-q")
    assert code == 0, err
    assert loaded == [torch.float32] and "float32" in out
