"""``llmprune bench``: checkpoint bytes, peak memory, prefill and decode tokens/s against the dense baseline.

One run measures every model (the checkpoint with its load-time and runtime features, then the dense
baseline) with the same random prompts, at batch 1 and a chosen batch:

* **checkpoint bytes**: weight files (``*.safetensors``, ``*.bin``, ``*.pt``) of the model's directory;
* **peak memory**: peak growth from before the load to the end of that batch's run (weights + activations + KV
  cache; batches run in increasing order): CUDA ``max_memory_allocated``; on CPU the process resident set
  (sampled every 5 ms; safetensors weights become resident at the first forward);
* **prefill tok/s**: ``batch × prompt_len`` / time of the forward over the prompt (cache built);
* **decode tok/s**: ``batch × new_tokens`` / time of ``new_tokens`` greedy single-token steps on that cache.

Timings are the median of ``repeats`` after one warm-up. On CPU everything runs on torch reference paths
(no Triton kernels) and the output says so.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmprune.config import RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.model.access import cache_argument, output_cache
from llmprune.model.device import resolve_device
from llmprune.model.loading import resolve_model
from llmprune.runtime.load import load_model
from llmprune.runtime.options import runtime_setup

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class BenchRow:
    """One measured (model, batch) pair; ``runtime`` holds the runtime options it ran with."""

    label: str
    model: str
    features: list[str]
    batch: int
    checkpoint_bytes: int | None
    peak_mem_bytes: int | None
    prefill_tok_s: float
    decode_tok_s: float
    prefill_ms: float
    decode_ms_per_token: float
    runtime: dict = field(default_factory=dict)
    dtype: str | None = None  # the dtype the model ran in (its floating-point weights)
    model_bytes: int | None = None  # bytes of the loaded weights and buffers, in that dtype


def _dtype_name(model) -> str | None:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return str(p.dtype).removeprefix("torch.") if p is not None else None


def _model_bytes(model) -> int:
    """Bytes of a loaded model's parameters and buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def checkpoint_bytes(ref: str) -> int | None:
    """Bytes of the weight files in a resolved model directory (None when it is not local)."""
    path = Path(ref)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def _rss() -> int:
    """Resident set size of this process, in bytes (psutil: Linux, macOS, Windows alike)."""
    import psutil

    return psutil.Process().memory_info().rss


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - non-glibc
        pass


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA allocator peak, or CPU RSS growth (sampled)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)  # peak - base: growth inside the block
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            self._base = _rss()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _rss())

    def current_peak(self) -> int:
        """Peak growth so far (inside the block)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        self._max = max(self._max, _rss())
        return self._max - self._base

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self._base
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_generation(model, batch: int, prompt_len: int, new_tokens: int, *, past_key_values=None,
                    repeats: int = 3, seed: int = 0) -> tuple[float, float]:
    """``(prefill_seconds, decode_seconds)`` medians for one batch size."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    pre, dec = [], []
    kw = cache_argument(model)
    for i in range(repeats + 1):  # the first pass is warm-up
        cache = past_key_values(batch) if past_key_values is not None else None
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **({kw: cache} if cache is not None else {}))
        _sync(device)
        t1 = time.perf_counter()
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
            cache = output_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        if i:
            pre.append(t1 - t0)
            dec.append(t2 - t1)
        del out, cache
    return statistics.median(pre), statistics.median(dec)


def bench_model(ref: str | None, *, label: str, runtime: RuntimeConfig | None, batches: list[int],
                prompt_len: int, new_tokens: int, device: torch.device, dtype: str, repeats: int,
                trust_remote_code: bool = False) -> list[BenchRow]:
    """Load ``ref`` with ``runtime`` options (:func:`llmprune.runtime.load.load_model`) and time every batch size."""
    resolved = resolve_model(ref)
    rows = []
    # One tracker from before the load: safetensors are memory-mapped, so on CPU the weights become resident
    # during the first forward, not during the load. Batches run in increasing order, so the running peak at
    # the end of a batch is that batch's peak (weights + activations + cache).
    with PeakMemory(device) as mem:
        model = load_model(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code, runtime=runtime)
        setup = runtime_setup(model)
        run_dtype, loaded_bytes = _dtype_name(model), _model_bytes(model)
        max_ctx = getattr(model.config, "max_position_embeddings", None)
        if max_ctx and prompt_len + new_tokens > max_ctx:
            raise ConfigError(f"--prompt-len + --new-tokens exceeds the model context ({max_ctx})")
        for b in batches:
            pre, dec = time_generation(model, b, prompt_len, new_tokens, past_key_values=setup.past_key_values,
                                       repeats=repeats)
            rows.append(BenchRow(
                label=label, model=str(ref or "smollm2-135m"), features=setup.features or ["dense"], batch=b,
                checkpoint_bytes=checkpoint_bytes(resolved), peak_mem_bytes=int(mem.current_peak()),
                prefill_tok_s=b * prompt_len / pre, decode_tok_s=b * new_tokens / dec if new_tokens else 0.0,
                prefill_ms=pre * 1e3, decode_ms_per_token=dec * 1e3 / max(new_tokens, 1), runtime=setup.options,
                dtype=run_dtype, model_bytes=loaded_bytes,
            ))
    del model
    _trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench(model_ref: str | None, baseline_ref: str | None = None, *, runtime: RuntimeConfig | None = None,
          batches: list[int] | None = None, prompt_len: int = 128, new_tokens: int = 32, device=None,
          dtype: str = "auto", repeats: int = 3, trust_remote_code: bool = False,
          baseline_dtype: str | None = None) -> dict:
    """Benchmark ``model_ref`` (with ``runtime`` options) and ``baseline_ref`` (dense, no options).

    The baseline runs in the dtype the model ran in unless ``baseline_dtype`` says otherwise, so the ratios
    compare pruning, not a bf16 model with an fp32 baseline; each row records its dtype.

    Returns:
        ``{"device", "cpu", "torch", "prompt_len", "new_tokens", "repeats", "rows": [BenchRow dicts]}``.
    """
    dev = resolve_device(device)
    batches = sorted(set(batches or [1]))
    if any(b < 1 for b in batches) or prompt_len < 1 or new_tokens < 0 or repeats < 1:
        raise ConfigError("batch sizes, --prompt-len and --repeats must be >= 1, --new-tokens >= 0")
    kw = dict(batches=batches, prompt_len=prompt_len, new_tokens=new_tokens, device=dev, dtype=dtype,
              repeats=repeats, trust_remote_code=trust_remote_code)
    rows = bench_model(model_ref, label="model", runtime=runtime, **kw)
    base_dtype = baseline_dtype or rows[0].dtype or dtype
    if baseline_ref is not None:
        rows += bench_model(baseline_ref, label="baseline", runtime=None, **{**kw, "dtype": base_dtype})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "cpu": dev.type == "cpu",
        "torch": torch.__version__,
        "dtype": dtype,
        "model_dtype": rows[0].dtype,
        "baseline_dtype": base_dtype if baseline_ref is not None else None,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "rows": [asdict(r) for r in rows],
    }


def format_bench(result: dict) -> str:
    """The :func:`bench` result as a text table, with model/baseline ratios per batch."""
    lines = []
    if result.get("cpu"):
        lines.append(f"device: {result['device']} - CPU run: torch reference paths, no Triton kernels "
                     "(tokens/s are not representative of GPU kernels)")
    else:
        lines.append(f"device: {result['device']}")
    lines.append(f"prompt {result['prompt_len']} tokens, {result['new_tokens']} decoded tokens, "
                 f"median of {result['repeats']} after warm-up; dtype: model {result.get('model_dtype')}"
                 + (f", baseline {result['baseline_dtype']}" if result.get("baseline_dtype") else ""))
    head = f"{'':9} {'features':<34} {'ckpt MiB':>9} {'batch':>5} {'peak MiB':>9} {'prefill tok/s':>13} {'decode tok/s':>12}"
    lines.append(head)
    for r in result["rows"]:
        ck = f"{r['checkpoint_bytes'] / 2**20:.1f}" if r["checkpoint_bytes"] else "-"
        pk = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r["peak_mem_bytes"] is not None else "-"
        feats = ", ".join(r["features"])[:34]
        lines.append(f"{r['label']:9} {feats:<34} {ck:>9} {r['batch']:>5} {pk:>9} "
                     f"{r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f}")
    by = {(r["label"], r["batch"]): r for r in result["rows"]}
    for (label, b), r in by.items():
        base = by.get(("baseline", b))
        if label == "model" and base:
            parts = []
            if r.get("model_bytes") and base.get("model_bytes"):
                parts.append(f"{r['model_bytes'] / base['model_bytes']:.2f}x loaded bytes ({r.get('dtype')} vs "
                             f"{base.get('dtype')})")
            if r["checkpoint_bytes"] and base["checkpoint_bytes"]:
                parts.append(f"{r['checkpoint_bytes'] / base['checkpoint_bytes']:.2f}x checkpoint bytes")
            parts.append(f"prefill {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x")
            if base["decode_tok_s"]:
                parts.append(f"decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x")
            lines.append(f"batch {b}: model vs baseline: " + ", ".join(parts))
    return "\n".join(lines)
