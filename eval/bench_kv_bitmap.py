"""Bitmap KV cache on a GPU: decode-attention kernel time vs dense SDPA, cache bytes, end-to-end decode tokens/s.

Part 1 (kernel): Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), one new token per sequence,
contexts 4k / 16k / 32k, batch 1 and 8, KV sparsity 0.5 and 0.7 (K and V), fp16. The cache state is built the way
`BitmapKVCache` holds it (all but the last `--window` tokens compressed). Timed with `triton.testing.do_bench`
(medians, warm L2: the same buffers every call; cold-L2 times with rotating buffer copies are in `eval/gpu_suite.py`):
  * dense: `torch.nn.functional.scaled_dot_product_attention(q, K, V, enable_gqa=True)` on the dense fp16 cache
    (what `sdpa` runs in decode with a `DynamicCache`);
  * bitmap: `llmprune.kernels.kv_bitmap_attention` (split-K, combine in the same launch) on bitmaps + offsets + values + window.
  Speedup = dense time / bitmap time; bytes = stored / dense. Each kernel row is first checked against the torch
  reference on the same pruned cache.
Part 2 (end to end): a Llama-shaped model with random weights (hidden 4096, 32 / 8 heads, head_dim 128, --e2e-layers
layers, fp16), prompt of --e2e-context tokens, then --e2e-new greedy decode steps timed (prefill excluded), with a
`DynamicCache` (sdpa) and with `BitmapKVCache` (Triton kernel), batch 1 and 8.

Writes eval/results/kv_bitmap_bench_<device>.md and .json. Needs CUDA; refuses otherwise.

Usage:
    python eval/bench_kv_bitmap.py [--dtype float16] [--contexts 4096,16384,32768] [--batches 1,8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch


def build_cache(B, Hkv, T, d, sparsity, window, dtype, device, seed=0):
    from llmprune.formats.bitmap import keep_count
    from llmprune.runtime.kvcache.store import _BitmapStore

    g = torch.Generator(device=device).manual_seed(seed)
    W = min(T, window)
    Tc = T - W
    k_dense = torch.randn(B, Hkv, T, d, generator=g, device=device, dtype=dtype)
    v_dense = torch.randn(B, Hkv, T, d, generator=g, device=device, dtype=dtype)
    ks = _BitmapStore(B, Hkv, d, keep_count(d, sparsity), dtype, device, capacity=Tc)
    vs = _BitmapStore(B, Hkv, d, keep_count(d, sparsity), dtype, device, capacity=Tc)
    step = 4096  # pack in pieces to bound the temporary memory of top-k / packing
    for s in range(0, Tc, step):
        e = min(Tc, s + step)
        ks.append(k_dense[:, :, s:e])
        vs.append(v_dense[:, :, s:e])
    kw = k_dense[:, :, Tc:].contiguous()
    vw = v_dense[:, :, Tc:].contiguous()
    args = (ks.bitmap, ks.offsets, ks.values, vs.bitmap, vs.offsets, vs.values, kw, vw, Tc)
    stored = ks.nbytes(2) + vs.nbytes(2) + 2 * kw.numel() * 2
    return args, k_dense, v_dense, stored


def kernel_part(a, device, dtype, log):
    from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention, kv_bitmap_attention_ref
    from triton.testing import do_bench

    Hq, Hkv, d = 32, 8, 128
    rows = []
    for B in a.batches:
        for T in a.contexts:
            dense_ms = None
            for sp in a.sparsities:
                args, kd, vd, stored = build_cache(B, Hkv, T, d, sp, a.window, dtype, device)
                q = torch.randn(B, Hq, 1, d, device=device, dtype=dtype)
                if dense_ms is None:
                    dense_ms = do_bench(lambda q=q, kd=kd, vd=vd: torch.nn.functional.scaled_dot_product_attention(
                        q, kd, vd, enable_gqa=True), warmup=50, rep=200, return_mode="median")
                best = None
                for bn in a.block_ns:
                    out = torch.empty_like(q)
                    ms = do_bench(lambda q=q, args=args, out=out, bn=bn: kv_bitmap_attention(q, *args, out=out, block_n=bn),
                                  warmup=50, rep=200, return_mode="median")
                    if best is None or ms < best[0]:
                        best = (ms, bn)
                ms, bn = best
                y = kv_bitmap_attention(q, *args, block_n=bn)
                ref = kv_bitmap_attention_ref(q, *args)
                err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                dense_bytes = 2 * kd.numel() * 2
                row = dict(batch=B, context=T, sparsity=sp, dense_ms=dense_ms, bitmap_ms=ms, block_n=bn,
                           speedup=dense_ms / ms, bytes_ratio=stored / dense_bytes, max_rel_err=err)
                rows.append(row)
                log(f"B={B} T={T} s={sp}: sdpa {dense_ms * 1e3:.1f} us, bitmap {ms * 1e3:.1f} us (block_n {bn}) "
                    f"-> {dense_ms / ms:.2f}x, bytes {stored / dense_bytes:.1%}, rel err {err:.1e}")
                args = kd = vd = None  # free before the next shape
                torch.cuda.empty_cache()
    return rows


def e2e_part(a, device, dtype, log):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from llmprune.runtime.kvcache import BitmapKVCache

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.e2e_layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                      max_position_embeddings=a.e2e_context + a.e2e_new + 16, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    rows = []
    for B in a.e2e_batches:
        ids = torch.randint(0, cfg.vocab_size, (B, a.e2e_context), device=device)
        for name in ["dense"] + [f"bitmap {s:g}" for s in a.sparsities]:
            if name == "dense":
                model.config._attn_implementation = "sdpa"
                cache = DynamicCache(config=model.config)
            else:
                s = float(name.split()[1])
                cache = BitmapKVCache(model.config, s, s, window=a.window, capacity=a.e2e_context + a.e2e_new)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
                # two untimed steps: the first flushes the prompt into the bitmaps (one-off) and warms the kernels
                for _ in range(2):
                    tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(a.e2e_new):
                    tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                sec = time.perf_counter() - t0
            if name == "dense":
                cache_bytes = sum(lay.keys.numel() + lay.values.numel() for lay in cache.layers) * 2
                ratio = 1.0
            else:
                cache_bytes, ratio = cache.bytes(element_size=2), cache.compression_ratio(element_size=2)
            row = dict(batch=B, context=a.e2e_context, cache=name, new_tokens=a.e2e_new, seconds=sec,
                       tokens_per_s=B * a.e2e_new / sec, step_ms=1e3 * sec / a.e2e_new,
                       cache_gib=cache_bytes / 2**30, bytes_ratio=ratio,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            rows.append(row)
            log(f"e2e B={B} ctx={a.e2e_context} {name}: {row['tokens_per_s']:.1f} tok/s ({row['step_ms']:.2f} ms/step), "
                f"cache {row['cache_gib']:.2f} GiB ({ratio:.1%}), peak {row['peak_gib']:.1f} GiB")
            del cache
            torch.cuda.empty_cache()
    model.config._attn_implementation = "sdpa"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--block-ns", default="32,64,128", help="kernel token-block sizes tried (best is reported)")
    ap.add_argument("--e2e-layers", type=int, default=8)
    ap.add_argument("--e2e-context", type=int, default=16384)
    ap.add_argument("--e2e-new", type=int, default=64)
    ap.add_argument("--e2e-batches", default="1,8")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4k and 16k, batch 1 only, e2e at 4k (smoke run)")
    ap.add_argument("--out-dir", default="eval/results")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kv_bitmap: needs a CUDA GPU (the kernel timings and tokens/s are GPU measurements); "
              "on CPU run the tests instead: TRITON_INTERPRET=1 pytest tests/kernels/test_kv_bitmap_kernel.py", file=sys.stderr)
        return 2
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    a.contexts, a.batches, a.e2e_batches, a.block_ns = ints(a.contexts), ints(a.batches), ints(a.e2e_batches), ints(a.block_ns)
    a.sparsities = [float(x) for x in a.sparsities.split(",")]
    if a.quick:
        a.contexts, a.batches, a.e2e_batches, a.e2e_context = [4096, 16384], [1], [1], 4096
    dtype = getattr(torch, a.dtype)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    log(f"device: {name}; torch {torch.__version__}; dtype {a.dtype}")
    krows = kernel_part(a, device, dtype, log)
    erows = [] if a.skip_e2e else e2e_part(a, device, dtype, log)

    md = [f"# Bitmap KV cache benchmark on {name}", "",
          f"torch {torch.__version__}, {a.dtype}, window {a.window}. Command: `python {' '.join(sys.argv)}`", "",
          "## Decode attention: one new token, 32 q heads / 8 KV heads / head_dim 128", "",
          "| batch | context | KV sparsity | SDPA dense (us) | bitmap kernel (us) | speedup | cache bytes / dense | block_n |",
          "|---|---|---|---|---|---|---|---|"]
    for r in krows:
        md.append(f"| {r['batch']} | {r['context']} | {r['sparsity']:g} | {r['dense_ms'] * 1e3:.1f} | "
                  f"{r['bitmap_ms'] * 1e3:.1f} | {r['speedup']:.2f}x | {r['bytes_ratio']:.1%} | {r['block_n']} |")
    if erows:
        md += ["", f"## End-to-end decode: random-weight Llama ({a.e2e_layers} layers of Llama-3-8B shape), "
               f"{a.e2e_new} greedy steps after a {a.e2e_context}-token prompt (prefill not timed)", "",
               "| batch | cache | tokens/s | ms/step | KV cache GiB | bytes / dense | peak GiB |", "|---|---|---|---|---|---|---|"]
        for r in erows:
            md.append(f"| {r['batch']} | {r['cache']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
                      f"{r['cache_gib']:.2f} | {r['bytes_ratio']:.1%} | {r['peak_gib']:.1f} |")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (out / f"kv_bitmap_bench_{slug}.md").write_text("\n".join(md) + "\n")
    (out / f"kv_bitmap_bench_{slug}.json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "args": vars(a), "kernel": krows, "e2e": erows}, indent=2) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
