"""generate / bench with the bitmap KV cache raise no ``past_key_values`` FutureWarning, and the README's cache
snippet and names are the ones that exist (issue 19, bug 8)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from helpers import run_cli

import llmprune

README = Path(__file__).resolve().parents[2] / "README.md"


def test_generate_and_bench_with_the_cache_do_not_warn(checkpoint, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "generate", checkpoint, "--prompt", "w1 w2 w3", "--max-new-tokens", 3,
                               "--kv-sparsity", "0.5", "--kv-window", "64", "--device", "cpu", "-q")
        assert code == 0, err
        code, _, err = run_cli(capsys, "bench", checkpoint, "--prompt-len", 8, "--new-tokens", 2, "--repeats", 1,
                               "--batch-size", 1, "--kv-sparsity", "0.5", "--kv-window", "64", "--baseline", "none",
                               "--no-record", "--device", "cpu", "-q")
        assert code == 0, err
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_readme_names_what_exists():
    text = README.read_text()
    assert "past_key_values=cache, max_new_tokens" not in text.replace("transformers 4.x: past_key_values=cache", "")
    files = {"llmprune.json"}  # a file name, not a module
    for dotted in set(re.findall(r"`(llmprune(?:\.\w+)+)", text)) - files:
        obj = None
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = __import__(".".join(parts[:i]), fromlist=["_"])
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            break
        assert obj is not None, f"README names {dotted}, which does not exist"
    assert llmprune.BitmapKVCache is not None
