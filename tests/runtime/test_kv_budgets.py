"""Non-uniform (entropy-guided) KV budgets: exact-mean integer allocation, per-head keep counts in the cache
(torch path and the Triton kernel identically), reload round trip, calibrate-kv and the runtime options."""

import json

import pytest
import torch
from helpers import check_close, run_cli, tiny_llama, tiny_text
from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention, kv_bitmap_attention_ref

from llmprune.config import RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.evaluate.perplexity import perplexity_with_cache
from llmprune.formats.bitmap import TILE_META_BYTES, keep_count, prune_topk
from llmprune.runtime.kvcache import BitmapKVCache, _BitmapStore
from llmprune.runtime.kvcache.budgets import (
    BUDGETS_FILE,
    KVBudgets,
    allocate_keeps,
    integer_keeps,
    load_budgets,
    make_budgets,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# -- allocation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.3, 0.5, 0.6, 0.7, 0.8])
@pytest.mark.parametrize("per", ["head", "layer"])
@pytest.mark.parametrize("power", [0.5, 1.0, 3.0])
def test_allocation_meets_the_mean_exactly_and_respects_bounds(s, per, power):
    g = torch.Generator().manual_seed(int(s * 10) + int(power))
    scores = (torch.rand(30, 3, generator=g) * 4).tolist()
    keeps = allocate_keeps(scores, 64, s, per=per, power=power)
    assert sum(map(sum, keeps)) == 30 * 3 * keep_count(64, s)  # exactly the uniform total: same bytes
    lo, hi = keep_count(64, min(0.95, s + 0.2)), keep_count(64, max(0.0, s - 0.3))
    assert all(lo <= k <= hi and isinstance(k, int) for row in keeps for k in row)
    if per == "layer":
        assert all(len(set(row)) == 1 for row in keeps)
    flat_s = [x for r in scores for x in r] if per == "head" else [sum(r) / 3 for r in scores for _ in r]
    flat_k = [k for r in keeps for k in r]
    # monotone: a higher score never gets fewer kept entries (up to the one-unit rounding)
    for i in range(len(flat_s)):
        for j in range(len(flat_s)):
            if flat_s[i] > flat_s[j]:
                assert flat_k[i] >= flat_k[j] - 1


def test_allocation_by_hand_and_uniform():
    assert allocate_keeps(None, 64, 0.7, layers=2, heads=3) == [[19] * 3] * 2
    assert allocate_keeps([[1.0, 2.0]], 64, 0.5, power=0) == [[32, 32]]
    # mapping keep ~ c * score, clipped: [1, 3] at total 64 -> 16, 48
    assert allocate_keeps([[1.0, 3.0]], 64, 0.5, min_sparsity=0.0, max_sparsity=0.9) == [[16, 48]]
    # clipped at the bounds, the rest redistributed
    assert allocate_keeps([[1.0, 100.0]], 64, 0.5, min_sparsity=0.25, max_sparsity=0.75) == [[16, 48]]
    assert integer_keeps([1.0, 1.0, 1.0], 10, 1, 5) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    for bad in (dict(min_sparsity=0.6), dict(max_sparsity=0.4), dict(per="token"), dict(power=-1)):
        with pytest.raises(ConfigError):
            allocate_keeps([[1.0, 2.0]], 64, 0.5, **bad)
    with pytest.raises(ConfigError):
        allocate_keeps([[1.0], [1.0, 2.0]], 64, 0.5)
    with pytest.raises(ConfigError):
        allocate_keeps([[float("nan")]], 64, 0.5)


def test_budgets_round_trip_and_bad_files(tmp_path):
    b = make_budgets([[1.0, 2.0], [3.0, 0.5]], [[2.0, 2.0], [1.0, 1.0]], 16, 0.5, 0.25, info={"note": "x"})
    path = b.save(tmp_path)
    assert path == tmp_path / BUDGETS_FILE
    again = load_budgets(tmp_path)
    assert again == b and load_budgets(path) == b
    assert b.mean_sparsity("k") == pytest.approx(1 - keep_count(16, 0.5) / 16)
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"format": "other"}), json.dumps({**b.to_dict(), "version": 9}),
                 json.dumps({**b.to_dict(), "k_keep": [[0, 3], [3, 3]]}),
                 json.dumps({k: v for k, v in b.to_dict().items() if k != "v_keep"})):
        bad.write_text(text)
        with pytest.raises(ConfigError):
            load_budgets(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_budgets(tmp_path / "missing.json")


# -- the store and the kernel --------------------------------------------------------------------------------------------
def _mixed_state(B, H, d, Tc, W, k_keeps, v_keeps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, Tc, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, H, Tc, d, generator=g).to(dtype).to(DEV)
    ks, vs = (_BitmapStore(B, H, d, kk, dtype, DEV) for kk in (k_keeps, v_keeps))
    for s in range(0, Tc, 32):  # several appends, as the cache flushes
        ks.append(k[:, :, s : s + 32])
        vs.append(v[:, :, s : s + 32])
    kw = torch.randn(B, H, W, d, generator=g).to(dtype).to(DEV)
    vw = torch.randn(B, H, W, d, generator=g).to(dtype).to(DEV)
    return k, v, ks, vs, kw, vw


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_and_reference_on_mixed_per_head_keep_counts(d, dtype):
    B, H, Tc, W, G = 2, 3, 96, 8, 3
    k_keeps, v_keeps = [d // 8, d // 2, d - 3], [d // 4, 5, d // 4 + 1]
    k, v, ks, vs, kw, vw = _mixed_state(B, H, d, Tc, W, k_keeps, v_keeps, dtype, seed=d)
    assert ks.mixed and ks.values.stride(1) == 0 and ks.values.shape == (B, H, Tc * sum(k_keeps))
    # the store holds exactly each head's own top-k (independent reference)
    want_k = torch.stack([prune_topk(k[:, h], kk) for h, kk in enumerate(k_keeps)], 1)
    assert torch.equal(ks.dense(), want_k)
    # bytes: real kept values, no padding to the largest head
    assert ks.nbytes(2) == B * (H * Tc * d // 64 * TILE_META_BYTES + Tc * sum(k_keeps) * 2)
    q = torch.randn(B, H * G, 1, d, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEV)
    args = (q, ks.bitmap, ks.offsets, ks.values, vs.bitmap, vs.offsets, vs.values, kw, vw, Tc)
    ref = kv_bitmap_attention_ref(*args)
    check_close(kv_bitmap_attention(*args, num_splits=2), ref)
    # the reference agrees with plain attention over the independently pruned K / V
    want_v = torch.stack([prune_topk(v[:, h], kk) for h, kk in enumerate(v_keeps)], 1)
    kk = torch.cat([want_k, kw], 2).float().repeat_interleave(G, 1)
    vv = torch.cat([want_v, vw], 2).float().repeat_interleave(G, 1)
    p = torch.softmax(q.float() @ kk.transpose(-1, -2) * d**-0.5, -1)
    check_close(ref, (p @ vv).to(dtype))


def test_kernel_with_a_head_that_keeps_everything():
    # a head at sparsity 0 (keep = head_dim: every bitmap word full) next to sparse heads, K and V
    B, H, Tc, W, G, d, dtype = 1, 3, 64, 4, 2, 64, torch.float16
    k, v, ks, vs, kw, vw = _mixed_state(B, H, d, Tc, W, [d, 3, d // 2], [5, d, d], dtype, seed=11)
    assert torch.equal(ks.dense()[:, 0], k[:, 0]) and torch.equal(vs.dense()[:, 1:], v[:, 1:])
    q = torch.randn(B, H * G, 1, d, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    args = (q, ks.bitmap, ks.offsets, ks.values, vs.bitmap, vs.offsets, vs.values, kw, vw, Tc)
    check_close(kv_bitmap_attention(*args, num_splits=1), kv_bitmap_attention_ref(*args))


def _budgets_for(model, k_keeps, v_keeps, ks=None, vs=None):
    d = model.config.head_dim
    n = len(k_keeps) * len(k_keeps[0]) * d
    ks = 1 - sum(map(sum, k_keeps)) / n if ks is None else ks
    vs = 1 - sum(map(sum, v_keeps)) / n if vs is None else vs
    return KVBudgets(d, k_keeps, v_keeps, ks, vs, "entropy")


def test_cache_torch_and_kernel_paths_identical_with_per_head_budgets():
    model = tiny_llama(hidden_size=192, num_attention_heads=6, num_key_value_heads=3, head_dim=64).to(DEV)
    b = _budgets_for(model, [[10, 30, 50], [19, 19, 20]], [[40, 8, 12], [5, 60, 33]])
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(6)).to(DEV)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
              attention_mask=torch.ones_like(ids))
    a = model.generate(ids, past_key_values=BitmapKVCache(model.config, window=16, backend="torch", allocation=b), **kw)
    cache = BitmapKVCache(model.config, window=16, backend="triton", allocation=b)
    b_out = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(a.sequences, b_out.sequences)
    for sa, sb in zip(a.scores, b_out.scores):
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)
    layer = cache.layers[0]
    assert layer.k_keep == [10, 30, 50] and layer.k_store.mixed and layer.compressed_tokens == 32
    # bytes: metadata for every tile of K and V (B=2, 3 heads), the real kept values (K 90, V 60 per token), window
    stored, dense = layer.nbytes(2)
    Tc, W, d = layer.compressed_tokens, layer.window_tokens, 64
    assert stored == 2 * (2 * 3 * Tc * TILE_META_BYTES + Tc * (90 + 60) * 2) + 2 * 2 * 3 * W * d * 2
    assert dense == 2 * 2 * 3 * (Tc + W) * d * 2


def test_uniform_budgets_equal_the_uniform_cache_and_zero_equals_dense():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 128), generator=torch.Generator().manual_seed(7))
    d = model.config.head_dim
    uni = make_budgets(None, None, d, 0.5, 0.25, layers=2, heads=2, allocation="uniform")
    r1 = perplexity_with_cache(model, ids, 64, k_sparsity=0.5, v_sparsity=0.25, window=16, progress=False)
    r2 = perplexity_with_cache(model, ids, 64, k_sparsity=0.5, v_sparsity=0.25, window=16, progress=False,
                               allocation=uni)
    assert r1.nll == r2.nll and r1.bytes_ratio == r2.bytes_ratio
    zero = _budgets_for(model, [[d, d], [d, d]], [[d, d], [d, d]])
    assert zero.k_sparsity == 0.0
    import llmprune

    dense = llmprune.perplexity(model, ids, seqlen=64, progress=False)
    r0 = perplexity_with_cache(model, ids, 64, k_sparsity=None, window=16, progress=False, allocation=zero)
    assert r0.ppl == pytest.approx(dense.ppl, rel=1e-5)
    # entropy-like mixed budgets at the same mean: the same kept values as uniform, plus the 4-byte offset per
    # 64-element tile of bitmap format version 1 (per-head keep counts; uniform rows are version 2, no offsets)
    mixed = _budgets_for(model, [[4, 12], [10, 6]], [[14, 10], [12, 12]], ks=0.5, vs=0.25)
    r3 = perplexity_with_cache(model, ids, 64, k_sparsity=0.5, v_sparsity=0.25, window=16, progress=False,
                               allocation=mixed)
    assert 0 < r3.bytes_ratio_16bit - r1.bytes_ratio_16bit <= 4 / (64 * 2) and r3.nll != r1.nll


def test_cache_checks_the_allocation():
    model = tiny_llama()
    b = _budgets_for(model, [[4, 12], [10, 6]], [[8, 8], [8, 8]])
    with pytest.raises(ConfigError, match="mean k_sparsity"):
        BitmapKVCache(model.config, 0.7, allocation=b)
    with pytest.raises(ConfigError, match="layers"):
        BitmapKVCache(tiny_llama(num_hidden_layers=3).config, allocation=b)
    with pytest.raises(ConfigError, match="model config"):
        BitmapKVCache(None, allocation=b)
    cache = BitmapKVCache(tiny_llama(num_key_value_heads=4).config, allocation=b)
    with pytest.raises(ConfigError, match="KV heads"):
        tiny_llama(num_key_value_heads=4)(input_ids=torch.tensor([[5, 6]]), past_key_values=cache)


# -- runtime options and the CLI --------------------------------------------------------------------------------------------
def test_runtime_config_allocation():
    cfg = RuntimeConfig(kv_allocation="x/kv_budgets.json")
    assert cfg.kv_enabled and cfg.kv_cache_settings() == {"k_sparsity": None, "v_sparsity": None, "window": 32,
                                                          "allocation": "x/kv_budgets.json"}
    assert RuntimeConfig(kv_sparsity=0.5, kv_allocation="uniform").kv_cache_settings() == {
        "k_sparsity": 0.5, "v_sparsity": 0.5, "window": 32}
    with pytest.raises(ConfigError, match="--kv-allocation uniform needs"):
        RuntimeConfig(kv_allocation="uniform")
    with pytest.raises(ConfigError, match="--kv-allocation must be"):
        RuntimeConfig(kv_allocation="")
    # a KV flag replaces the recorded KV group, budgets included
    assert RuntimeConfig(kv_sparsity=0.7, kv_allocation="a.json").override(RuntimeConfig(kv_sparsity=0.5)) == \
        RuntimeConfig(kv_sparsity=0.5)


def test_calibrate_kv_checkpoint_and_runtime_pickup(checkpoint, tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    code, out, err = run_cli(capsys, "calibrate-kv", checkpoint, "--kv-sparsity", 0.5, "--calib", tiny_calib_file,
                             "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "-q")
    assert code == 0, err
    assert "recorded in" in out and (checkpoint / BUDGETS_FILE).is_file()
    b = load_budgets(checkpoint)
    assert b.allocation == "entropy" and b.layers == 2 and b.heads == 2
    assert sum(map(sum, b.k_keep)) == 4 * keep_count(16, 0.5) and len(b.info["scores"]["k_entropy"]) == 2
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    assert meta["recipe"]["runtime"]["kv_allocation"] == BUDGETS_FILE and meta["kv_budgets"]["allocation"] == "entropy"
    text = tmp_path / "wiki.txt"
    text.write_text(tiny_text(600))
    # ppl picks the recorded budgets up (through the runtime options), generate too
    code, out, err = run_cli(capsys, "ppl", checkpoint, "--data-path", text, "--seqlen", 64, "--max-windows", 1,
                             "--device", "cpu", "-q")
    assert code == 0, err
    assert "bitmap KV cache K 0.5 / V 0.5" in out
    r = perplexity_with_cache(__import__("llmprune").load(checkpoint, device="cpu"),
                              __import__("llmprune").evaluate.perplexity.token_stream(
                                  __import__("llmprune").load_tokenizer(checkpoint), text.read_text()),
                              64, 1, k_sparsity=0.5, window=32, progress=False, allocation=checkpoint)
    assert f"wikitext2 ppl {r.ppl:.3f}" in out
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", "w1 w2 w3", "--max-new-tokens", 40,
                             "--device", "cpu", "-q")
    assert code == 0, err
    assert "bitmap KV cache K 0.5 / V 0.5" in err
    # a sidecar for a model that is not a checkpoint
    side = tmp_path / "side"
    code, out, err = run_cli(capsys, "calibrate-kv", tiny_model_dir, "--kv-sparsity", 0.7, "--calib", tiny_calib_file,
                             "--nsamples", 2, "--seqlen", 32, "--per", "layer", "-o", side, "--device", "cpu", "-q")
    assert code == 0, err
    assert all(len(set(r)) == 1 for r in load_budgets(side).k_keep)
    code, out, err = run_cli(capsys, "ppl", tiny_model_dir, "--data-path", text, "--seqlen", 64, "--max-windows", 1,
                             "--kv-allocation", side, "--kv-sparsity", 0.5, "--device", "cpu", "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmprune: error:") and "mean k_sparsity" in err


@pytest.mark.parametrize("argv,msg", [
    (("--kv-sparsity", 1.5), "--k-sparsity must be in [0, 1)"),
    ((), "needs --kv-sparsity"),
    (("--kv-sparsity", 0.5, "--min-sparsity", 0.6), "must contain the mean"),
    (("--kv-sparsity", 0.5, "--power", -1), "power must be"),
    (("--kv-sparsity", 0.5, "--allocation", "random"), "invalid choice"),
    (("--kv-sparsity", 0.5), "not a checkpoint directory"),
])
def test_calibrate_kv_bad_inputs(tiny_model_dir, capsys, argv, msg):
    code, out, err = run_cli(capsys, "calibrate-kv", tiny_model_dir, *argv, "--calib", "self", "--device", "cpu", "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmprune: error:") and msg in err, err


def test_bad_allocation_flag(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "wiki.txt"
    text.write_text(tiny_text(600))
    code, out, err = run_cli(capsys, "ppl", tiny_model_dir, "--data-path", text, "--kv-allocation",
                             tmp_path / "nope.json", "--device", "cpu", "-q")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
