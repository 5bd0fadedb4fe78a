"""Shared fixtures: tiny saved models, a tiny llmprune checkpoint, calibration text; offline environment.

Plain helpers (tiny models, tokenizer, tolerances, ``run_cli``) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run through the interpreter on CPU (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import tiny_llama, tiny_text, tiny_tokenizer  # noqa: E402


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama + tokenizer, loadable by path."""
    model = tiny_llama()
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    """A tiny llmprune checkpoint (magnitude 2:4, no calibration) whose base_model is tiny_model_dir."""
    from llmprune.cli import main

    code = main(["compress", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "2:4", "--device", "cpu",
                 "-o", str(tmp_path / "ckpt"), "-q"])
    assert code == 0
    return tmp_path / "ckpt"


@pytest.fixture
def tiny_calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(tiny_text(6000))
    return p


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never touch the network; the Hub is unreachable here anyway.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
