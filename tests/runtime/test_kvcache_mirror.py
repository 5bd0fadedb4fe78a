"""Bitmap KV cache, torch path: the incrementally grown dense mirror returns exactly the old full rebuild."""

import pytest
import torch
from helpers import tiny_llama

import llmprune.runtime.kvcache.layer as cache_mod
from llmprune.evaluate.perplexity import perplexity_with_cache
from llmprune.runtime.kvcache import BitmapKVCache
from llmprune.runtime.kvcache.mirror import DenseMirror


def _full_rebuild(layer):
    """What ``update`` returned before the mirror: the whole store decompressed, then the window."""
    if layer.compressed_tokens == 0:
        return layer.keys, layer.values
    return (torch.cat([layer.k_store.dense(), layer.keys], dim=-2),
            torch.cat([layer.v_store.dense(), layer.values], dim=-2))


@pytest.mark.parametrize("keeps", [None, ([3, 8], [5, 1])])  # uniform sparsity, per-head keep counts
def test_mirror_equals_full_rebuild_over_flushes_and_reorders(keeps):
    B, H, d, window = 3, 2, 8, 8  # window * d = 64: one tile per flushed token block
    kw = {} if keeps is None else dict(k_keeps=keeps[0], v_keeps=keeps[1], head_dim=d)
    layer = cache_mod.BitmapKVLayer(0.6, 0.3, window, owner=None, **kw)
    g = torch.Generator().manual_seed(0)
    steps = [37] + [1] * 40 + [3, 5] + [1] * 30  # prefill, decode, a few multi-token steps: > 10 flushes
    flushes = 0
    for i, q in enumerate(steps):
        if i == 20:
            layer.reorder_cache(torch.tensor([2, 0, 1]))  # beam reorder
        if i == 50:
            layer.batch_select_indices(torch.tensor([True, False, True]))  # drop a row
            B = 2
        if i == 60:
            layer.batch_repeat_interleave(2)
            B = 4
        before = layer.compressed_tokens
        k, v = torch.randn(B, H, q, d, generator=g), torch.randn(B, H, q, d, generator=g)
        got = layer.update(k, v)
        flushes += layer.compressed_tokens > before
        assert layer.mirror is not None
        ref = _full_rebuild(layer)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"step {i}"
        assert got[0].shape == (B, H, layer.get_seq_length(), d)
    assert flushes >= 10 and layer.compressed_tokens == 112 and layer.window_tokens == 3  # 115 tokens
    # the reported bytes are the compressed store's (mirror excluded), the mirror's own are reported apart
    es = 4
    window_bytes = 2 * B * H * layer.window_tokens * d * es
    assert layer.nbytes()[0] == layer.k_store.nbytes(es) + layer.v_store.nbytes(es) + window_bytes
    assert layer.mirror_nbytes() == 2 * layer.mirror.k.numel() * es >= 2 * B * H * layer.get_seq_length() * d * es
    layer.reset()
    assert layer.mirror is None and layer.mirror_nbytes() == 0


def test_mirror_grows_by_doubling_and_keeps_content():
    m = DenseMirror(4, torch.float32, "cpu")
    x = torch.arange(2 * 70 * 4, dtype=torch.float32).view(1, 2, 70, 4)
    m.write(0, x[:, :, :10], -x[:, :, :10])
    assert m.k.shape[-2] == 64
    m.write(10, x[:, :, 10:70], -x[:, :, 10:70])  # 70 > 64: grows to 128
    assert m.k.shape[-2] == 128
    k, v = m.view(70)
    assert torch.equal(k, x) and torch.equal(v, -x)
    m.write(3, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))  # in place
    assert m.view(70)[0][:, :, 3:5].abs().sum() == 0 and torch.equal(m.view(70)[0][:, :, 5:], x[:, :, 5:])


def _no_mirror(monkeypatch):
    monkeypatch.setattr(cache_mod, "DenseMirror", lambda *a, **k: None)  # every layer takes the full rebuild


def test_generate_and_perplexity_unchanged_by_mirror(monkeypatch):
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    text = torch.randint(3, 128, (1, 192), generator=g)
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, output_scores=True,
              return_dict_in_generate=True)

    def run():
        with torch.no_grad():
            cache = BitmapKVCache(model.config, 0.6, 0.4, window=16, backend="torch")
            out = model.generate(ids, past_key_values=cache, **kw)
            beams = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3,
                                   past_key_values=BitmapKVCache(model.config, 0.5, window=16, backend="torch"))
        ppl = perplexity_with_cache(model, text, seqlen=96, k_sparsity=0.7, window=16, progress=False)
        return out, beams, ppl, cache

    new, new_beams, new_ppl, cache = run()
    assert all(layer.mirror is not None for layer in cache.bitmap_layers())
    _no_mirror(monkeypatch)
    old, old_beams, old_ppl, old_cache = run()
    assert all(layer.mirror is None for layer in old_cache.bitmap_layers())
    assert torch.equal(new.sequences, old.sequences) and torch.equal(new_beams, old_beams)
    assert all(torch.equal(a, b) for a, b in zip(new.scores, old.scores))
    assert new_ppl.nll == old_ppl.nll and new_ppl.windows == old_ppl.windows == 2
    assert cache.memory_report() == old_cache.memory_report()


def test_no_mirror_where_the_kernel_runs():
    """backend="triton" (interpreter on CPU): decode takes the kernel, so the layer keeps no dense mirror."""
    model = tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    cache = BitmapKVCache(model.config, 0.5, window=16, backend="triton")
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 20)), past_key_values=cache)
    assert all(layer.mirror is None for layer in cache.bitmap_layers())
