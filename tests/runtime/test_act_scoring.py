"""Decode-faithful scoring of continuations under activation sparsity (llmprune.runtime.actsparse.scoring)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama, tiny_tokenizer

from llmprune.errors import ConfigError
from llmprune.runtime.actsparse.apply import act_sparsity, attach_act_sparsity, detach_act_sparsity
from llmprune.runtime.actsparse.calibrate import act_threshold_tables
from llmprune.runtime.actsparse.correction import crop_cache
from llmprune.runtime.actsparse.scoring import ScoringStats, score_continuations

CPU = torch.device("cpu")
TOL = dict(atol=2e-5, rtol=0)


@functools.cache
def _thresholds():
    model = tiny_llama()
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return act_threshold_tables(model, ids, CPU, 0.5, "uniform", batch_size=2), ids


def _setup(target=0.5, prefill=False):
    model = tiny_llama()  # seeded: the model the thresholds were calibrated on
    th, ids = _thresholds()
    attach_act_sparsity(model, th, target, prefill=prefill)
    ctx = ids[0, :12].tolist()
    conts = [ids[1, :7].tolist(), ids[2, :1].tolist(), ids[3, :5].tolist()]
    return model, ctx, conts


def _lp(logits):
    return F.log_softmax(logits.float(), -1)


def _stepwise(model, ctx, cont, period=None):
    """Reference: the runtime's own decode loop, one token per forward (sparse by the decode-only rule)."""
    rt = act_sparsity(model)
    out = model(torch.tensor([ctx]), use_cache=True)
    cache, rows = out.past_key_values, [_lp(out.logits[0, -1])]
    for i, tok in enumerate(cont[:-1]):
        out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        rows.append(_lp(out.logits[0, -1]))
        if period and (i + 1) % period == 0 and i + 1 < len(cont) - 1:  # dense rewrite of the last K tokens
            crop_cache(cache, len(ctx) + i + 1 - period)
            rt.enabled = False
            model(torch.tensor([cont[i + 1 - period:i + 1]]), past_key_values=cache, use_cache=True)
            rt.enabled = True
    lp = torch.stack(rows)
    return lp.gather(1, torch.tensor(cont)[:, None])[:, 0]


def _one_forward(model, ctx, cont):
    logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:]
    return _lp(logits).gather(1, torch.tensor(cont)[:, None])[:, 0]


@torch.no_grad()
def test_continuation_scores_equal_token_by_token_decode_steps():
    model, ctx, conts = _setup()
    stats = ScoringStats()
    scored = score_continuations(model, ctx, conts, stats=stats)
    for (lp, _), cont in zip(scored, conts):
        assert lp.shape == (len(cont),)
        torch.testing.assert_close(lp, _stepwise(model, ctx, cont), **TOL)
    # one prefill for the shared context; the first token of each continuation is scored by it
    assert stats.to_dict() == {"contexts": 1, "requests": 3, "prefill_tokens": 3, "decode_tokens": 6 + 0 + 4,
                               "rewrites": 0, "decode_fraction": 10 / 13}
    dense_lp = _one_forward(model, ctx, conts[0])  # lm-eval's forward: a prefill, dense under decode-only
    assert torch.allclose(scored[0][0][0], dense_lp[0], **TOL)  # same first token (dense prefill)
    assert not torch.allclose(scored[0][0][1:], dense_lp[1:], atol=1e-3)  # the decode steps are sparse
    torch.testing.assert_close(scored[1][0], dense_lp.new_tensor([float(_one_forward(model, ctx, conts[1]))]), **TOL)
    assert act_sparsity(model).enabled and not act_sparsity(model).prefill  # flags restored


@torch.no_grad()
def test_correction_rewrites_the_kv_of_every_k_tokens_and_keeps_sparse_scores():
    model, ctx, conts = _setup()
    plain = score_continuations(model, ctx, conts[:1])[0][0]
    stats = ScoringStats()
    corrected = score_continuations(model, ctx, conts[:1], period=2, stats=stats)[0][0]
    torch.testing.assert_close(corrected, _stepwise(model, ctx, conts[0], period=2), **TOL)
    # 6 decode steps in chunks of 2: rewrites after the first two chunks, none after the last
    assert stats.rewrites == 2
    torch.testing.assert_close(corrected[:3], plain[:3], **TOL)  # before the first rewrite: identical
    assert not torch.allclose(corrected[3:], plain[3:], atol=1e-4)  # after it: the dense KV history counts


@torch.no_grad()
def test_zero_sparsity_is_the_dense_forward_and_sparse_prefill_is_the_all_sparse_forward():
    model, ctx, conts = _setup(target=0.0)
    for (lp, _), cont in zip(score_continuations(model, ctx, conts, period=3), conts):
        torch.testing.assert_close(lp, _one_forward(model, ctx, cont), **TOL)
    model, ctx, conts = _setup(prefill=True)  # act_prefill: every position sparse, as one sparse forward
    for (lp, _), cont in zip(score_continuations(model, ctx, conts), conts):
        torch.testing.assert_close(lp, _one_forward(model, ctx, cont), **TOL)


@torch.no_grad()
def test_bad_scoring_inputs_are_config_errors():
    model, ctx, conts = _setup()
    with pytest.raises(ConfigError, match="integer >= 1"):
        score_continuations(model, ctx, conts, period=0)
    with pytest.raises(ConfigError, match="at least one token"):
        score_continuations(model, ctx, [[]])
    detach_act_sparsity(model)
    with pytest.raises(ConfigError, match="needs activation sparsity"):
        score_continuations(model, ctx, conts)


@torch.no_grad()
def test_lm_eval_model_scores_requests_in_order_with_shared_prefills():
    from llmprune.evaluate.lm_eval_decode import decode_scoring_lm

    model, ctx, conts = _setup()
    lm = decode_scoring_lm(model, tiny_tokenizer(), period=2, batch_size=1)
    other = ctx[3:]
    requests = [(("a", "b"), ctx, conts[0]), (None, other, conts[2]), (("a", "c"), ctx, conts[1])]
    res = lm._loglikelihood_tokens(requests)
    want = [score_continuations(model, c, [k], period=2)[0] for _, c, k in requests]
    assert [r[1] for r in res] == [w[1] for w in want]
    torch.testing.assert_close(torch.tensor([r[0] for r in res]), torch.stack([w[0].sum() for w in want]), **TOL)
    assert lm.act_scoring["stats"].contexts == 2 and lm.act_scoring["stats"].requests == 3
    detach_act_sparsity(model)
    with pytest.raises(ConfigError, match="need activation sparsity"):
        decode_scoring_lm(model, tiny_tokenizer())


def test_eval_cli_decode_scoring_and_correction_are_recorded(checkpoint, tiny_calib_file, tmp_path, capsys):
    import json

    from helpers import run_cli

    data = tmp_path / "data"
    data.mkdir()
    doc = {"query": "Question: w1 w2 w3?", "choices": ["w4 w5 w6 w7", "w6", "w7 w8 w9 w10 w11"], "gold": 1}
    (data / "arc_easy.jsonl").write_text(json.dumps(doc) + "\n")
    code, _, err = run_cli(capsys, "calibrate-act", checkpoint, "--act-sparsity", 0.5, "--calib", tiny_calib_file,
                           "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "-q")
    assert code == 0, err
    common = ["eval", checkpoint, "--tasks", "arc_easy", "--data-dir", data, "--device", "cpu", "-q"]
    code, out, err = run_cli(capsys, *common, "--act-correction", 2, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "run dense unless" not in out  # the forward-scoring note is not printed
    scoring = json.loads((tmp_path / "r.json").read_text())["llmprune"]["act_scoring"]
    assert scoring["mode"] == "decode" and scoring["correction"] == 2
    assert scoring["stats"]["contexts"] == 1 and scoring["stats"]["requests"] == 3
    assert scoring["stats"]["rewrites"] > 0
    stored = json.loads((checkpoint / "eval_results.json").read_text())["lm_eval"]
    assert any("act_scoring=decode" in k and "act_correction=2" in k for k in stored), list(stored)
    code, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "arc_easy", "--data-dir", data, "--device", "cpu",
                           "--act-scoring", "sideways", "-q")
    assert code == 2 and "invalid choice" in err
