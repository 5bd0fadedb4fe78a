"""One-pass pruned-cache emulation (equals the real chunked BitmapKVCache) and the end-to-end KV sensitivity."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from llmprune.calibration.kv_emulate import emulated_kv_cache, pruned_cache_attention_ref
from llmprune.calibration.kv_sensitivity import (
    KVSensitivity,
    keep_grid,
    kv_sensitivity,
    merge_sensitivity_parts,
)
from llmprune.evaluate.perplexity import perplexity_with_cache
from llmprune.formats.bitmap import prune_topk
from llmprune.runtime.kvcache.budgets import KVBudgets

K_KEEP = [[3, 16], [8, 5]]  # [layer][kv head], head_dim 16: mixed, one head dense
V_KEEP = [[6, 2], [16, 11]]


def test_attention_ref_by_hand():
    # 1 head, 4 tokens, window 2: queries 2, 3 see tokens 0, 1 pruned; query 0, 1 see everything dense.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 4, generator=g) for _ in range(3))
    out = pruned_cache_attention_ref(q, k, v, [1], [2], window=2)
    for t in range(4):
        old = 2 * (t // 2)
        keys = torch.cat([prune_topk(k[0, 0, :old], 1), k[0, 0, old : t + 1]])
        vals = torch.cat([prune_topk(v[0, 0, :old], 2), v[0, 0, old : t + 1]])
        ref = torch.softmax(q[0, 0, t] @ keys.T / 2.0, -1) @ vals
        torch.testing.assert_close(out[0, 0, t], ref, rtol=1e-5, atol=1e-6)
    # dense keeps: plain causal attention
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(pruned_cache_attention_ref(q, k, v, [4], [4], window=2), dense, rtol=1e-5, atol=1e-6)


def test_emulation_equals_the_real_chunked_cache_with_per_head_budgets():
    model = tiny_llama(max_position_embeddings=256)
    ids = torch.randint(3, 100, (1, 128), generator=torch.Generator().manual_seed(1))
    b = KVBudgets(16, K_KEEP, V_KEEP, 0.5, 0.5, "sensitivity")
    real = perplexity_with_cache(model, ids, seqlen=64, k_sparsity=None, window=16, backend="torch",
                                 progress=False, allocation=b)
    nll = 0.0
    with torch.no_grad(), emulated_kv_cache(model, window=16) as emu:
        for i in range(2):
            emu.set(i, K_KEEP[i], V_KEEP[i])
        for w in range(2):
            x = ids[:, w * 64 : (w + 1) * 64]
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
    assert math.isclose(math.exp(nll / 126), real.ppl, rel_tol=1e-5)
    assert model.config._attn_implementation != "llmprune_kv_emulate"  # restored


def test_sensitivity_shapes_zero_when_dense_and_replay_matches_full_pass():
    model = tiny_llama(max_position_embeddings=256)
    ids = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(2))
    s = kv_sensitivity(model, ids, torch.device("cpu"), keeps=[8, 2], window=16, per="head")
    assert s.keeps == [8, 2] and (s.head_dim, s.heads, s.tokens) == (16, 2, 96)
    assert [len(s.k), len(s.k[0]), len(s.k[0][0])] == [2, 2, 2] and [len(s.v), len(s.v[1])] == [2, 2]
    assert all(e >= 0 for t in (s.k, s.v) for layer in t for unit in layer for e in unit)
    assert KVSensitivity.from_dict(s.to_dict()).to_dict() == s.to_dict()
    # layer 1 head 0 values at keep 2, by a plain full pass (no replay of layer 0)
    with torch.no_grad():
        dense = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, :-1]
        with emulated_kv_cache(model, 16) as emu:
            emu.set(1, None, [2, 16])
            pruned = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, :-1]
    kl = float((dense.exp() * (dense - pruned)).sum()) / (2 * 47)
    assert s.v[1][0][1] == pytest.approx(kl, rel=1e-4, abs=1e-12)
    assert s.v[1][0][1] > 0
    with pytest.raises(ValueError):
        kv_sensitivity(model, ids, torch.device("cpu"), keeps=[16], window=16)
    with pytest.raises(ValueError):
        kv_sensitivity(model, ids, torch.device("cpu"), per="token")


def test_keep_grid():
    assert keep_grid(64) == [48, 32, 24, 16, 12, 8, 5, 3]
    assert keep_grid(16) == [12, 8, 6, 4, 3, 2, 1]  # duplicates dropped
    assert keep_grid(16, (0.5, 0.01)) == [8, 1]


def _part(keeps, k_err, v_err, samples, tokens):
    return {"keeps": keeps, "k_err": k_err, "v_err": v_err, "head_dim": 16, "heads": 2, "per": "layer",
            "window": 16, "tokens": tokens, "seconds": 1.0, "samples": samples}


def test_merge_parts_by_layer_keep_and_sequences():
    # samples 0:1 (tokens 1): layer 0 at keeps 8 and 4 in one part, layer 1 in another, keep 2 in a third;
    # samples 1:4 (tokens 3): keeps 8 and 4 only -> merged keeps [8, 4], weights 1/4 and 3/4.
    a = _part([8, 4], [[[1.0, 2.0]], []], [[[0.5, 1.0]], []], "0:1", 1)
    b = _part([8, 4], [[], [[4.0, 8.0]]], [[], [[0.25, 0.5]]], "0:1", 1)
    c = _part([2], [[[9.0]], [[9.0]]], [[[9.0]], [[9.0]]], "0:1", 1)
    d = _part([4, 8], [[[6.0, 5.0]], [[12.0, 8.0]]], [[[3.0, 1.5]], [[0.5, 0.25]]], "1:4", 3)
    m = merge_sensitivity_parts([a, b, c, d])
    assert m["keeps"] == [8, 4] and m["tokens"] == 4 and m["samples"] == ["0:1", "1:4"] and m["seconds"] == 4.0
    assert m["k_err"] == [[[0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * 6]], [[0.25 * 4 + 0.75 * 8, 0.25 * 8 + 0.75 * 12]]]
    assert m["v_err"] == [[[0.25 * 0.5 + 0.75 * 1.5, 0.25 * 1 + 0.75 * 3]], [[0.25, 0.25 * 0.5 + 0.75 * 0.5]]]
    # one sample group only: keep 2 is measured everywhere too
    assert merge_sensitivity_parts([a, b, c])["keeps"] == [8, 4, 2]
    # legacy parts without "samples" fall back to the calibration's nsamples
    legacy = {k: v for k, v in a.items() if k != "samples"} | {"calib": {"nsamples": 1}}
    assert merge_sensitivity_parts([legacy, b])["samples"] == ["0:1"]
    with pytest.raises(ValueError, match="every layer"):
        merge_sensitivity_parts([a, d])  # samples 0:1 lack layer 1
    with pytest.raises(ValueError, match="per"):
        merge_sensitivity_parts([a, b | {"per": "head"}])
    with pytest.raises(ValueError, match="tokens"):
        merge_sensitivity_parts([a, b | {"tokens": 2}])
    with pytest.raises(ValueError):
        merge_sensitivity_parts([])
