"""End-to-end on the real SmolLM2-135M (kept short: few samples, short windows)."""

import json

import pytest
import torch
from helpers import C4_PARQUET, WIKITEXT, needs_shared
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.cli import main
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text

pytestmark = [pytest.mark.real_model, needs_shared(C4_PARQUET), needs_shared(WIKITEXT)]


@pytest.fixture(scope="module")
def wiki_ids():
    tok = llmprune.load_tokenizer("smollm2-135m")
    return token_stream(tok, wikitext2_text(WIKITEXT))[:, : 4 * 256]


def test_compress_real_model_end_to_end(tmp_path, wiki_ids, capsys):
    out = tmp_path / "smollm2-wanda-2of4"
    code = main(["compress", "smollm2-135m", "--method", "wanda", "--sparsity", "2:4", "--calib", str(C4_PARQUET),
                 "--nsamples", "8", "--seqlen", "128", "--device", "cpu", "--output", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "saved dense checkpoint" in captured.out
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert len(meta["sparsity"]["modules"]) == 30 * 7

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    up = pruned.model.layers[3].mlp.up_proj.weight
    assert ((up != 0).reshape(up.shape[0], -1, 4).sum(-1) <= 2).all()

    dense = llmprune.load("smollm2-135m")
    magnitude = llmprune.load("smollm2-135m")
    llmprune.prune(magnitude, llmprune.MagnitudeConfig(sparsity="2:4"), device="cpu", progress=False)
    ppl = {name: perplexity(m, wiki_ids, 256, progress=False).ppl
           for name, m in (("dense", dense), ("wanda", pruned), ("magnitude", magnitude))}
    assert all(torch.isfinite(torch.tensor(v)) for v in ppl.values()), ppl
    # The papers' ordering, with a wide margin: pruning hurts, Wanda hurts far less than magnitude.
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"], ppl

    tok = llmprune.load_tokenizer(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gen = pruned.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
