"""Streaming compress memory: the peak does not grow with depth beyond the (memory-mapped) weights."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_tokenizer

import llmprune
from llmprune.config import CalibConfig, Recipe

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="needs /proc (Linux)")


def rss_anon() -> int:
    """Anonymous resident memory (bytes): what the process allocated, not file pages mapped from disk."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def peak_rss_anon_delta(fn) -> int:
    """Peak of RssAnon while ``fn()`` runs, minus RssAnon before (sampled every millisecond)."""
    gc.collect()
    base = rss_anon()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            done.wait(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], rss_anon())
    return peak[0] - base


def test_peak_memory_flat_in_depth(tmp_path, tiny_calib_file, monkeypatch):
    import llmprune.streaming as streaming

    events = []
    load, write = streaming._load_tensors, streaming.ShardWriter.write
    monkeypatch.setattr(streaming, "_load_tensors", lambda m, keys, *a: (events.append(("load", keys[0])), load(m, keys, *a)))
    monkeypatch.setattr(streaming.ShardWriter, "write", lambda self, k, t: (events.append(("write", k)), write(self, k, t)))
    shape = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2)
    recipe = Recipe(stages=[llmprune.WandaConfig(sparsity="2:4")],
                    calibration=CalibConfig(source=str(tiny_calib_file), nsamples=4, seqlen=32, batch_size=4))
    peaks, sizes = {}, {}
    for mode in ("stream",):
        for n in (4, 20):
            src = tmp_path / f"m{n}"
            if not src.exists():
                model = tiny_llama(num_hidden_layers=n, **shape)
                sizes[n] = sum(p.numel() * p.element_size() for p in model.parameters())
                model.save_pretrained(src)
                tiny_tokenizer().save_pretrained(src)
                del model
            out = tmp_path / f"{mode}{n}"
            peaks[mode, n] = peak_rss_anon_delta(lambda s=src, o=out, m=mode: llmprune.compress(
                str(s), recipe, o, device="cpu", progress=False, low_memory=m == "stream"))
    extra = sizes[20] - sizes[4]  # 16 more layers, ~50 MB of fp32 weights (the whole model loaded: +50 MB)
    grow = peaks["stream", 20] - peaks["stream", 4]
    msg = f"peaks {dict((f'{k[0]}{k[1]}', v >> 20) for k, v in peaks.items())} MiB, extra weights {extra >> 20} MiB"
    assert grow < 0.25 * extra, "streaming peak grew with depth: " + msg
    # Output written incrementally: each layer's tensors reach the shard before the next layer is loaded.
    layer_of = lambda key: int(key.split(".")[2]) if key.startswith("model.layers.") else -1  # noqa: E731
    loads = [i for i, (kind, key) in enumerate(events) if kind == "load" and layer_of(key) >= 0]
    for n in range(1, 20):
        first_load = next(i for i in loads[-20:] if layer_of(events[i][1]) == n)
        prev_writes = [i for i, (kind, key) in enumerate(events) if kind == "write" and layer_of(key) == n - 1]
        assert prev_writes and max(prev_writes) < first_load
