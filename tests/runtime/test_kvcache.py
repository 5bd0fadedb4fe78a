"""Bitmap KV cache: format, per-token pruning, HF generate integration, faithful perplexity protocol."""

import pytest
import torch
from helpers import tiny_llama
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import llmprune
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.evaluate.perplexity import perplexity_with_cache
from llmprune.runtime.kvcache import (
    TILE,
    BitmapKVCache,
    _BitmapStore,
    expected_ratio,
    keep_count,
    pack_bitmap,
    unpack_bitmap,
)
from llmprune.sparsity import topk_mask


# -- format ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (65,), (3, 130), (2, 3, 5, 17), (4, 0)])
def test_pack_unpack_roundtrip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    x[torch.rand(*shape, generator=g) < 0.6] = 0  # rows with different kept counts
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        bt = pack_bitmap(x.to(dtype))
        assert bt.bitmap.dtype == torch.int64 and bt.offsets.dtype == torch.int32
        assert bt.bitmap.shape[-1] == -(-shape[-1] // TILE)
        assert torch.equal(unpack_bitmap(bt), x.to(dtype))


def test_pack_layout_by_hand():
    x = torch.zeros(130)
    x[[0, 5, 63]] = torch.tensor([1.0, 2.0, 3.0])
    x[64 + 1] = 4.0
    x[128 + 1] = 5.0
    bt = pack_bitmap(x)
    assert bt.bitmap.tolist() == [1 | (1 << 5) | -(1 << 63), 1 << 1, 1 << 1]  # bit 63 is the int64 sign bit
    assert bt.offsets.tolist() == [0, 3, 4]
    assert bt.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert bt.nbytes(element_size=2) == 3 * 8 + 3 * 4 + 5 * 2


def test_topk_per_token_by_hand():
    x = torch.tensor([[[[0.1, -5.0, 3.0, 0.2], [4.0, 1.0, -1.5, -0.5]]]])  # [1, 1, 2 tokens, d=4]
    assert keep_count(4, 0.5) == 2
    m = topk_mask(x, 2)
    assert m.tolist() == [[[[False, True, True, False], [True, False, True, False]]]]
    st = _BitmapStore(1, 1, 4, 2, torch.float32, "cpu")
    st.append(torch.cat([x] * 16, dim=2))  # 32 tokens * 4 = 128 elements = 2 tiles
    dense = st.dense()
    assert torch.equal(dense[0, 0, :2], x[0, 0] * m[0, 0])
    assert st.values.shape[-1] == 32 * 2


def test_keep_count_and_ratio():
    assert keep_count(128, 0.7) == 38 and keep_count(64, 0.7) == 19 and keep_count(64, 0.0) == 64
    with pytest.raises(ConfigError):
        keep_count(64, 1.0)
    # 16-bit cache, 70%: (8 B per 64-element tile + kept * 2) / dense -- within the <= 45% target (format 2; the
    # version-1 layout also stores a 4-byte offset per tile)
    assert expected_ratio(128, 0.7) == pytest.approx((2 * 8 + 38 * 2) / 256)
    assert expected_ratio(128, 0.7, version=1) == pytest.approx((2 * 12 + 38 * 2) / 256)
    assert expected_ratio(64, 0.7) < 0.45


# -- cache in transformers ------------------------------------------------------------------------------------------
def _prompts(batch=2, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second sequence
    return ids, mask


def test_generate_zero_sparsity_matches_dynamic_cache():
    model = tiny_llama()  # GQA: 4 query heads, 2 KV heads
    ids, mask = _prompts()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                         past_key_values=DynamicCache(config=model.config))
    cache = BitmapKVCache(model.config, k_sparsity=0.0, v_sparsity=0.0, window=16, backend="torch")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, past_key_values=cache)
    assert torch.equal(got, ref)
    rep = cache.memory_report()
    assert rep["compressed_tokens"] == 48 and rep["window_tokens"] == 1  # 49 tokens cached


def test_generate_pruned_batch_and_bytes():
    model = tiny_llama(num_key_value_heads=1)  # MQA
    ids, mask = _prompts()
    cache = llmprune.BitmapKVCache(model.config, k_sparsity=0.7, v_sparsity=0.5, window=16)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 50)
    layer = cache.layers[0]
    assert layer.k_keep == keep_count(16, 0.7) == 5 and layer.v_keep == 8
    stored, dense = cache.bytes(element_size=2), cache.dense_bytes(element_size=2)
    # by hand: 2 layers x batch 2 x 1 KV head; 48 compressed tokens (48 x 16 = 12 tiles of 64, an 8-byte bitmap word
    # each: format 2 stores no offsets), 1 window token
    per_row = 12 * 8 * 2 + 48 * (5 + 8) * 2 + 2 * 1 * 16 * 2
    assert stored == 2 * 2 * per_row
    assert dense == 2 * 2 * 2 * 49 * 16 * 2
    assert cache.compression_ratio(element_size=2) == pytest.approx(stored / dense)


class _RefPrunedLayer(DynamicLayer):
    """Reference: stores dense K/V; entries older than the compressed boundary are pruned on the fly (argsort)."""

    def __init__(self, k_keep, v_keep, window):
        super().__init__()
        self.k_keep, self.v_keep, self.window, self.c = k_keep, v_keep, window, 0

    @staticmethod
    def _prune(x, k):
        idx = x.abs().argsort(dim=-1, descending=True)[..., :k]
        return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))

    def update(self, key_states, value_states, *args, **kwargs):
        n = self.get_seq_length()
        self.c += ((n - self.c) // self.window) * self.window  # flush rule: whole windows, at the next update
        keys, values = super().update(key_states, value_states)
        c = self.c
        return (torch.cat([self._prune(keys[:, :, :c], self.k_keep), keys[:, :, c:]], 2),
                torch.cat([self._prune(values[:, :, :c], self.v_keep), values[:, :, c:]], 2))


def test_prefill_and_decode_logits_match_reference_pruned_attention():
    model = tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    ids = torch.randint(3, 128, (2, 56), generator=torch.Generator().manual_seed(5))
    window, ks, vs = 8, 0.6, 0.4
    cache = BitmapKVCache(model.config, ks, vs, window=window, backend="torch")
    ref = DynamicCache(config=model.config)
    ref.layers = [_RefPrunedLayer(keep_count(32, ks), keep_count(32, vs), window) for _ in range(2)]
    steps = [ids[:, :37]] + [ids[:, i : i + 1] for i in range(37, 56)]  # prefill 37 tokens, then decode
    with torch.no_grad():
        for x in steps:
            a = model(input_ids=x, past_key_values=cache, use_cache=True).logits
            b = model(input_ids=x, past_key_values=ref, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].compressed_tokens == 48 and cache.layers[0].window_tokens == 8


def test_chunked_protocol_equals_token_by_token_decode():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c1 = BitmapKVCache(model.config, 0.7, window=16, backend="torch")
        step = torch.cat([model(input_ids=ids[:, i : i + 1], past_key_values=c1).logits for i in range(64)], 1)
        c2 = BitmapKVCache(model.config, 0.7, window=16, backend="torch")
        chunk = torch.cat([model(input_ids=ids[:, i : i + 16], past_key_values=c2).logits for i in range(0, 64, 16)], 1)
    torch.testing.assert_close(step, chunk, rtol=1e-5, atol=1e-5)
    res = perplexity_with_cache(model, torch.cat([ids, ids], 1), seqlen=64, k_sparsity=0.7, window=16, progress=False)
    nll = torch.nn.functional.cross_entropy(chunk[0, :-1], ids[0, 1:])
    assert res.windows == 2 and res.nll == pytest.approx(float(nll), rel=1e-5)
    # sparsity 0 through the cache is the plain one-pass perplexity
    dense = llmprune.perplexity(model, ids, seqlen=64, progress=False)
    assert perplexity_with_cache(model, ids, 64, k_sparsity=0.0, window=16, progress=False).ppl == pytest.approx(
        dense.ppl, rel=1e-5)


def test_triton_kernel_path_in_generate(monkeypatch):
    """backend="triton" (interpreter on CPU): decode runs the kernel on the bitmap storage, same tokens as torch."""
    import llmprune.kernels.kv_bitmap_attention as kmod

    calls = []
    real = kmod.kv_bitmap_attention
    monkeypatch.setattr(kmod, "kv_bitmap_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs on CUDA, or interpreted on CPU
    model = tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64).to(dev)
    ids, mask = (t.to(dev) for t in _prompts(length=18))
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a = model.generate(ids, past_key_values=BitmapKVCache(model.config, 0.7, 0.5, window=16, backend="torch"), **kw)
    assert not calls
    cache = BitmapKVCache(model.config, 0.7, 0.5, window=16, backend="triton")
    assert model.config._attn_implementation == "llmprune_kv_bitmap"
    b = model.generate(ids, past_key_values=cache, **kw)
    assert len(calls) == 2 * 4  # 2 layers x 4 decode steps; the prefill went to sdpa
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)


def test_default_window_is_the_config_default():
    from llmprune.config import DEFAULT_KV_WINDOW

    assert BitmapKVCache(tiny_llama().config, 0.5).window == DEFAULT_KV_WINDOW


def test_bad_settings():
    model = tiny_llama()
    with pytest.raises(ConfigError):
        BitmapKVCache(model.config, k_sparsity=1.2)
    with pytest.raises(ConfigError):
        BitmapKVCache(model.config, window=0)
    cache = BitmapKVCache(model.config, 0.5, window=3)  # 3 tokens x head_dim 16 is not a whole number of tiles
    with pytest.raises(LlmpruneError, match="multiple of 64"):
        model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache)


# -- CLI -------------------------------------------------------------------------------------------------------------
def _cli(capsys, *argv):
    from llmprune.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_and_ppl_commands(tiny_model_dir, tmp_path, capsys):
    from helpers import tiny_text

    code, out, err = _cli(capsys, "generate", tiny_model_dir, "--prompt", "w1 w2 w3", "--prompt", "w4 w5",
                          "--max-new-tokens", 40, "--kv-sparsity", 0.7, "--kv-window", 16, "--device", "cpu", "-q")
    assert code == 0, err
    assert out.count("--- [") == 2 and "bitmap KV cache K 0.7 / V 0.7, window 16" in err
    text = tmp_path / "wiki.txt"
    text.write_text(tiny_text(600))
    code, out, err = _cli(capsys, "ppl", tiny_model_dir, "--data-path", text, "--seqlen", 64, "--max-windows", 2,
                          "--k-sparsity", 0.5, "--v-sparsity", 0.25, "--kv-window", 16, "--device", "cpu", "-q")
    assert code == 0, err
    assert "2 windows x 64 tokens" in out and "bitmap KV cache K 0.5 / V 0.25, window 16" in out
    code, out, err = _cli(capsys, "ppl", tiny_model_dir, "--data-path", text, "--kv-sparsity", 1.5, "-q")
    assert code == 2 and "--k-sparsity must be in [0, 1)" in err
    code, out, err = _cli(capsys, "generate", tiny_model_dir, "--prompt", "w1", "--kv-window", 8, "-q")
    assert code == 2 and "--kv-window needs --kv-sparsity" in err


def test_flush_after_prefill():
    model = tiny_llama()
    cache = BitmapKVCache(model.config, 0.5, window=16, backend="torch")
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 40)), past_key_values=cache)
    assert cache.compression_ratio() == 1.0  # the prefill is still in the window
    cache.flush()
    rep = cache.memory_report()
    assert (rep["compressed_tokens"], rep["window_tokens"]) == (32, 8) and rep["ratio"] < 1.0
    assert cache.get_seq_length() == 40
