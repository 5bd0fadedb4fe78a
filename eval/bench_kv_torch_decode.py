"""CPU decode-step time of the bitmap KV cache's torch path vs a dense ``DynamicCache`` at long contexts.

The model (default ``smollm2-135m``, float32) decodes one token at a time over a cache that already holds
``context`` tokens. The cache is filled with random K/V (``cache.update`` per layer, as a prefill would; the values
do not change the cost) so no long prefill is needed. Each decode step is one ``model(...)`` forward of one token;
the median of ``--steps`` steps (after ``--warmup``) is reported. With the bitmap cache the steps cross
``steps / window`` flushes, so the median includes the flush cost amortised as it occurs in generation.

Usage:
    OMP_NUM_THREADS=1 python eval/bench_kv_torch_decode.py --contexts 2048,8192 [--steps 64] [--sparsity 0.7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmprune.model.access import cache_argument
from llmprune.runtime.kvcache import BitmapKVCache
from llmprune.runtime.load import load_model


def fill(cache, model, T: int, seed: int = 0) -> None:
    cfg = model.config
    Hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(1, Hkv, T, d, generator=g, dtype=model.dtype)
        v = torch.randn(1, Hkv, T, d, generator=g, dtype=model.dtype)
        cache.update(k, v, i)


@torch.no_grad()
def step_times(model, cache, T: int, steps: int, warmup: int) -> list[float]:
    key = cache_argument(model)
    tok = torch.tensor([[1]])
    times = []
    for s in range(warmup + steps):
        pos = T + s
        t0 = time.perf_counter()
        model(input_ids=tok, position_ids=torch.tensor([[pos]]), cache_position=torch.tensor([pos]),
              attention_mask=torch.ones(1, pos + 1, dtype=torch.long), use_cache=True, **{key: cache})
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, device="cpu")
    from transformers import DynamicCache

    print(f"torch threads {torch.get_num_threads()}; median decode step (ms) over {args.steps} steps")
    print("| context | dense DynamicCache | bitmap kv %.0f%% (torch path) |" % (100 * args.sparsity))
    print("|---|---|---|")
    for T in (int(c) for c in args.contexts.split(",")):
        row = []
        for make in (lambda: DynamicCache(config=model.config),
                     lambda: BitmapKVCache(model.config, k_sparsity=args.sparsity, backend="torch")):
            cache = make()
            fill(cache, model, T)
            row.append(1000 * statistics.median(step_times(model, cache, T, args.steps, args.warmup)))
        print(f"| {T} | {row[0]:.1f} | {row[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
