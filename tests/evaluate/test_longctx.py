"""Long-context tasks: deterministic generation, needle depth, scorer, generation through the runtime caches, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, tiny_llama

from llmprune.evaluate.longctx.haystack import Haystack
from llmprune.evaluate.longctx.prompt import count_tokens, encode
from llmprune.evaluate.longctx.report import card_section, entries, summarize
from llmprune.evaluate.longctx.runner import Variant, _greedy_config, eos_ids, generate, run_samples
from llmprune.evaluate.longctx.scoring import string_match_all
from llmprune.evaluate.longctx.tasks import (
    MAX_NEW_TOKENS,
    TASK_NAMES,
    insert_needles,
    make_sample,
    make_samples,
)
from llmprune.runtime.kvcache import BitmapKVCache

VOCAB = 257  # 256 bytes + <eos>


@pytest.fixture(scope="module")
def byte_tok():
    """Byte-level tokenizer (one token per byte, no merges): token positions are byte offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok)
    out.add_special_tokens({"eos_token": "<eos>"})
    assert out.eos_token_id == 256 and len(out("ab c", add_special_tokens=False).input_ids) == 4
    return out


@pytest.fixture(scope="module")
def filler():
    return Haystack.load(None)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=1024, eos_token_id=256, pad_token_id=256,
                      bos_token_id=0)


def test_generation_is_deterministic_and_extends(byte_tok, filler):
    tasks = [t for t in TASK_NAMES if t != "cwe"]  # cwe's 300-word minimum needs more bytes: test_task_contents
    a = make_samples(tasks, [1200], 2, byte_tok, filler, seed=3)
    b = make_samples(tasks, [1200], 3, byte_tok, filler, seed=3)
    assert [s.to_json() for s in a] == [s.to_json() for s in b if s.index < 2]
    other = make_sample("niah_single", 1200, 0, byte_tok, filler, seed=4)
    assert other.outputs != a[0].outputs
    for s in b:  # fits the budget and fills it
        budget = s.context - MAX_NEW_TOKENS[s.task]
        assert count_tokens(byte_tok, s.prompt) == s.n_tokens
        assert budget * 0.9 <= s.n_tokens <= budget, (s.task, s.n_tokens, budget)


@pytest.mark.parametrize("index,depth", [(0, 0.0), (3, 0.3), (5, 0.5), (10, 1.0)])
def test_needle_sits_at_the_requested_depth(byte_tok, filler, index, depth):
    s = make_sample("niah_single", 1500, index, byte_tok, filler)
    assert s.depth == depth
    head, tail = "afterwards.\n", "\nWhat are all"
    start = s.prompt.index(head) + len(head)
    end = s.prompt.index(tail)
    needle = s.prompt.index("One of the special magic numbers")
    # token positions (the byte tokenizer: one token per character of this ASCII text)
    hay = len(encode(byte_tok, s.prompt[start:end]))
    needle_len = len(encode(byte_tok, s.prompt[needle:s.prompt.index(".", needle + 40) + 1]))
    pos = len(encode(byte_tok, s.prompt[start:needle]))
    tol = max(len(c) for c in filler.chunks) + 2  # the nearest chunk boundary
    assert abs(pos - depth * (hay - needle_len)) <= tol
    assert s.outputs[0] in s.prompt[needle:needle + 80]


def test_insert_needles_hand_built():
    chunks = [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    assert insert_needles(chunks, ["N"], [0.5]) == "a b N c d"
    assert insert_needles(chunks, ["N"], [0.0]) == "N a b c d"
    assert insert_needles(chunks, ["N"], [1.0]) == "a b c d N"
    assert insert_needles(chunks, ["X", "Y"], [0.26, 0.24]) == "a X Y b c d"  # same boundary: order kept


def test_task_contents(byte_tok, filler):
    mk = make_sample("niah_multikey", 1500, 1, byte_tok, filler)
    assert mk.input.count("One of the special magic numbers") == 4 and len(mk.outputs) == 1
    mv = make_sample("niah_multivalue", 1500, 1, byte_tok, filler)
    assert len(set(mv.outputs)) == 4 and all(f"is: {v}." in mv.input for v in mv.outputs)
    vt = make_sample("vartrack", 1500, 1, byte_tok, filler)
    pos = [vt.input.index(f"VAR {name} = ") for name in vt.outputs]
    assert pos == sorted(pos) and len(vt.outputs) == 5  # the chain stays in order
    cwe = make_sample("cwe", 4000, 0, byte_tok, filler)
    assert cwe.to_json() == make_sample("cwe", 4000, 0, byte_tok, filler).to_json()
    assert 4000 * 0.9 <= cwe.n_tokens <= 4000 - MAX_NEW_TOKENS["cwe"]
    words = [line.split(". ", 1)[1] for line in cwe.input.splitlines() if line[:1].isdigit()]
    counts = {w: words.count(w) for w in set(words)}
    assert {w for w, c in counts.items() if c == 30} == set(cwe.outputs) and len(cwe.outputs) == 10
    assert max(c for w, c in counts.items() if w not in cwe.outputs) < 30


def test_corpus_haystack(tmp_path, byte_tok):
    p = tmp_path / "corpus.txt"
    p.write_text("Alpha beta gamma. Delta epsilon!\nZeta eta theta? Iota kappa.\n" * 50)
    hay = Haystack.load(p)
    assert hay.chunks[:3] == ["Alpha beta gamma.", "Delta epsilon!", "Zeta eta theta?"]
    s = make_sample("niah_single", 900, 2, byte_tok, hay)
    assert "Delta epsilon!" in s.input


def test_scorer_on_hand_written_answers():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("1234 567", ["1234567"]) == 0.0
    assert string_match_all("1111111, 2222222 and 9", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert string_match_all("APPLE, river", ["apple", "River"]) == 1.0
    assert string_match_all("\x00 abc\x01def ", ["abc\ndef"]) == 1.0  # control characters become newlines


def _cache(model, sparsity):
    return lambda batch_size: BitmapKVCache(model.config, k_sparsity=sparsity, window=32)


def test_generate_kv0_equals_dense_and_shared_prefill_equals_plain_generate(model, byte_tok, filler):
    samples = [make_sample("niah_single", 600, 0, byte_tok, filler), make_sample("vartrack", 600, 1, byte_tok, filler)]
    f0, f5 = _cache(model, 0.0), _cache(model, 0.5)
    res = run_samples(model, byte_tok, samples, [Variant("dense"), Variant("kv0", cache=f0), Variant("kv5", cache=f5)])
    for d, k in zip(res["dense"], res["kv0"]):
        assert d.prediction == k.prediction and d.new_tokens == k.new_tokens
        assert d.kv_bytes == d.kv_dense_bytes > 0 and k.kv_dense_bytes == d.kv_dense_bytes
    assert all(r.kv_bytes < r.kv_dense_bytes for r in res["kv5"])
    # the shared prefill computes exactly what generate() with the cache from the start computes
    ids = torch.tensor([encode(byte_tok, samples[0].prompt)])
    eos = eos_ids(model, byte_tok)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=f5(1),
                               generation_config=_greedy_config(model, 24, eos))
    want = plain[0, ids.shape[1]:].tolist()
    assert generate(model, ids, 24, [f5], eos)[0][0] == want
    # an early stop (the runner's "all references found") cuts the same continuation short
    assert generate(model, ids, 24, [f5], eos, stop=lambda toks: len(toks) >= 3)[0][0] == want[:3]
    rows = summarize(res["kv5"])
    assert {(r["task"], r["n"]) for r in rows} == {("niah_single", 1), ("vartrack", 1)}
    card = "\n".join(card_section({"longctx": {**entries(summarize(res["dense"]), model="m", runtime={}, settings={}),
                                               **entries(rows, model="m", runtime={"kv_sparsity": 0.5}, settings={})}}))
    assert "| niah_single | 600 | 1 | " in card and "kv_sparsity=0.5" in card


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, byte_tok):
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    byte_tok.save_pretrained(d)
    return d


def test_cli_end_to_end_and_task_files(capsys, tmp_path, model_dir, byte_tok, filler):
    out = tmp_path / "r.json"
    code, text, err = run_cli(capsys, "eval", model_dir, "--tasks", "niah_single", "--context", "600", "--samples",
                              "1", "--kv-sparsity", "0.0", "--json", out, "--device", "cpu")
    assert code == 0, err
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"dense", "kv_sparsity=0.0"}
    assert [s["prediction"] for s in runs["dense"]["samples"]] == [s["prediction"] for s in runs["kv_sparsity=0.0"]["samples"]]
    assert "| niah_single | 600 | 1 |" in text

    code, text, err = run_cli(capsys, "eval", model_dir, "--tasks", "niah_single,vartrack", "--context", "700",
                              "--samples", "2", "--write-tasks", tmp_path / "t")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "t" / "longctx_vartrack_700.jsonl").read_text().splitlines()]
    want = make_sample("vartrack", 700, 1, byte_tok, filler, seed=1234)
    assert rows[1]["input"] == want.input and rows[1]["outputs"] == want.outputs
    yml = (tmp_path / "t" / "longctx_vartrack_700.yaml").read_text()
    assert "output_type: generate_until" in yml and "max_gen_toks: 30" in yml
    ns: dict = {}  # as lm-eval imports it: a module of its own (no future flags inherited from this file)
    exec(compile((tmp_path / "t" / "longctx_utils.py").read_text(), "longctx_utils.py", "exec", dont_inherit=True), ns)
    assert ns["process_results"]({"outputs": ["AB", "CD"]}, [" ab and x"]) == {"string_match_all": 0.5}


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", "niah_singel", "--context", "700"], "unknown long-context task(s): niah_singel"),
    (["--tasks", "niah_single,arc_easy"], "mixes long-context tasks"),
    (["--tasks", "niah_single", "--context", "4096"], "larger than the model's maximum context (1024 tokens)"),
    (["--tasks", "niah_single", "--context", "100"], "--context 100 is too short for niah_single"),
    (["--tasks", "niah_single", "--context", "2k"], "--context: not an integer"),
    (["--tasks", "cwe", "--context", "700", "--limit", "3"], "--limit is for lm-eval tasks"),
])
def test_cli_bad_inputs_are_one_line_errors(capsys, model_dir, argv, msg):
    code, out, err = run_cli(capsys, "eval", model_dir, *argv, "--device", "cpu")
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("llmprune: error:")]
    assert len(lines) == 1 and msg in lines[0], err
