"""Shared test helpers: tiny random models, a tiny offline tokenizer, the kernel tolerance table, run_cli."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
C4_PARQUET = SHARED / "data" / "c4" / "c4_validation_2k.parquet"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw.txt"

TINY_VOCAB = 128

# Kernel-vs-reference tolerance on ||out - ref|| / ||ref||, keyed by the reference dtype: kernels
# accumulate in fp32 but sum in another order and round P to the input dtype before P @ V (flash-attention
# style), so outputs differ by about one rounding of the dtype.
KERNEL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def check_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel output ``y`` matches ``ref``: same shape, finite, relative error within :data:`KERNEL_TOL`.

    Besides the norm-relative error, no single element may be off by more than 10x the tolerance
    of ``max |ref|`` (a handful of wrong outputs in a large tensor barely moves the norm).
    """
    assert y.shape == ref.shape, f"shape {tuple(y.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(y).all(), "non-finite outputs"
    tol = KERNEL_TOL[ref.dtype]
    diff = y.float() - ref.float()
    err = diff.norm() / ref.float().norm().clamp_min(1e-12)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    worst = diff.abs().max() / ref.float().abs().max().clamp_min(1e-12)
    assert worst <= 10 * tol, f"max elementwise error {worst:.3g} of max |ref| > {10 * tol}"


def needs_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (CI provides ../shared)")


def tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary (no download, no model needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY_VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_text(n_words: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (n_words,), generator=g)
    return " ".join(f"w{i - 3}" for i in ids.tolist())


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_model(arch: str, seed: int = 0):
    """Tiny random causal LM of a given architecture family."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        return tiny_llama(seed)
    if arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, sliding_window=None, **common)
        return tf.MistralForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        return tf.Qwen2ForCausalLM(cfg).eval()
    if arch == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, **common)
        return tf.OPTForCausalLM(cfg).eval()
    raise ValueError(arch)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``llmprune`` in-process with ``argv`` (items str()-ed); returns ``(exit code, stdout, stderr)``."""
    from llmprune.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def checkpoint_tensors(directory) -> dict:
    """Every tensor of a checkpoint directory's safetensors files."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_checkpoint(a, b) -> None:
    """Two checkpoints hold bit-identical tensors and the same ``llmprune.json`` up to run-specific fields.

    Timing, the command line, the base model and the calibration source are recorded per run (the last two
    relative to each output), so they are not compared.
    """
    import json

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ma, mb = (json.loads((Path(d) / "llmprune.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for k in ("prune_seconds", "command", "base_model"):
            m.pop(k, None)
        for d in (m["recipe"]["calibration"], m.get("calibration") or {}):
            d.pop("source", None)
    assert ma == mb
