"""Decode attention: learned-gate block-sparse Triton kernel vs dense SDPA (needs a CUDA GPU).

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128), batch 1, one query token, bf16,
KV cache of 8k / 32k / 64k tokens, blocks of 64, 50% and 90% of the blocks skipped (first and last block always
kept, the rest chosen at random per KV head: the kernel's cost does not depend on which blocks). Median times
from ``triton.testing``, in two modes: ``graph`` (CUDA-graph replay: GPU time without Python launch overhead,
as in a decode loop captured with CUDA graphs) and ``eager`` (plain launches, overhead included). Both reuse the
same buffers, so they are *warm-L2* times: at 32k / 90% the selected blocks (13.6 MB) stay in L2 while the dense
cache (134 MB) cannot, which flatters the ratio; cold-L2 times are in ``eval/gpu_suite.py``. Columns:

* ``kernel``: :func:`llmprune.kernels.gated_attention.gated_attention` given top-k block indices + counts
  (what the gate's top-k yields; no sort), best over a few split counts; the default split heuristic and the
  bool-mask input (mask -> sorted indices conversion included) are shown too;
* ``kernel + gate``: the whole decode-time selection too: project the query, score it against the pooled gate
  keys of every block, force first/last block, top-k, kernel (:class:`llmprune.runtime.gates.gate.AttnGate`, random init:
  cost only);
* ``dense``: the faster of SDPA with ``enable_gqa`` and SDPA on the GQA-packed query (what transformers runs
  at decode), over the whole cache.

    python eval/bench_gated_attention.py            # writes eval/results/bench_gated_attention.md (+ .json)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

MODE = {"graph": True}


def bench(fn) -> float:
    """Median ms: CUDA-graph replay (GPU time, no Python launch overhead) or plain ``do_bench`` (eager)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if MODE["graph"]:
        return do_bench_cudagraph(fn, return_mode="median")
    return do_bench(fn, return_mode="median")


def bench_dense(q, k, v) -> tuple[float, float]:
    """SDPA over the whole cache: ``enable_gqa`` and GQA-packed query (ms)."""
    hkv, d = k.shape[1], q.shape[-1]
    q4, qp = q[:, :, None], q.view(1, hkv, q.shape[1] // hkv, d)
    return (bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)),
            bench(lambda: F.scaled_dot_product_attention(qp, k, v)))


def bench_point(q, k, v, gate, s: float, bs: int) -> dict:
    """Kernel (best split count and default) and kernel + gate scoring/selection at block sparsity ``s`` (ms)."""
    import triton
    from llmprune.kernels.gated_attention import default_splits, gated_attention, gated_attention_ref


    dev, (_, hq, d), hkv, length = q.device, q.shape, k.shape[1], k.shape[2]
    nb = triton.cdiv(length, bs)
    keep_n = max(2, math.ceil((1 - s) * nb - 1e-9))
    scores = torch.rand(1, hkv, nb, device=dev)
    scores[..., 0] = scores[..., -1] = 2.0  # first and last block always kept
    idx = scores.topk(keep_n, -1).indices  # int64, unsorted: what the gate's top-k hands the kernel
    cnt = torch.full((1, hkv), keep_n, dtype=torch.int32, device=dev)
    mask = torch.zeros(1, hkv, nb, dtype=torch.bool, device=dev).scatter_(-1, idx, True)
    ref = gated_attention_ref(q, k, v, mask, bs)
    out = torch.empty_like(q)
    default = default_splits(hkv, nb, dev)
    times = {}
    for splits in sorted({default, 4, 8, 16, 32, 64}):
        gated_attention(q, k, v, idx, bs, counts=cnt, out=out, num_splits=splits)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if err > 2e-2:
            raise SystemExit(f"kernel mismatch at L={length} s={s} splits={splits}: rel err {err:.3g}")
        times[splits] = bench(lambda sp=splits: gated_attention(q, k, v, idx, bs, counts=cnt, out=out, num_splits=sp))
    best = min(times, key=times.get)
    t_mask = bench(lambda: gated_attention(q, k, v, mask, bs, out=out, num_splits=best))
    gk = torch.randn(1, hkv, nb, gate.cfg.gate_dim, device=dev)  # pooled gate keys, as kept by the runtime
    kpos, qpos = torch.arange(nb, device=dev), torch.tensor([nb - 1], device=dev)

    def gated_step():  # decode step: gate scores -> forced first/last -> top-k indices -> kernel
        qf = q.float().view(1, hkv, 1, (hq // hkv) * d)
        logp = gate.scores(gate.project_q(qf, qpos), gk, qpos, kpos)[:, :, 0]
        logp[..., 0] = logp[..., -1] = float("inf")
        return gated_attention(q, k, v, logp.topk(keep_n, -1).indices, bs, counts=cnt, out=out, num_splits=best)

    with torch.no_grad():
        t_full = bench(gated_step)
    return dict(kept_blocks=keep_n, n_blocks=nb, kernel_ms=times[best], kernel_splits=best,
                kernel_default_ms=times[default], default_splits=default, kernel_mask_ms=t_mask,
                kernel_gate_ms=t_full)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="8192,32768,65536")
    ap.add_argument("--sparsities", default="0.5,0.9")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--timing", default="both", choices=["both", "graph", "eager"])
    ap.add_argument("--out", default="eval/results/bench_gated_attention.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gated_attention: needs a CUDA GPU (the Triton decode kernel is timed against SDPA on the "
              "device); nothing measured.", file=sys.stderr)
        return 2

    import triton

    from llmprune.runtime.gates.gate import AttnGate, GateConfig

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    hq, hkv, d, bs = 32, 8, 128, args.block_size
    name = torch.cuda.get_device_name(dev)
    gate = AttnGate(GateConfig(1, hq, hkv, d, block_size=bs)).to(dev).eval()
    rows, records = [], []
    torch.manual_seed(0)
    modes = ["graph", "eager"] if args.timing == "both" else [args.timing]
    for length in [int(x) for x in args.contexts.split(",")]:
        q = torch.randn(1, hq, d, device=dev, dtype=dtype)
        k = torch.randn(1, hkv, length, d, device=dev, dtype=dtype)
        v = torch.randn(1, hkv, length, d, device=dev, dtype=dtype)
        for mode in modes:
            MODE["graph"] = mode == "graph"
            t_gqa, t_pack = bench_dense(q, k, v)
            for s in [float(x) for x in args.sparsities.split(",")]:
                rec = bench_point(q, k, v, gate, s, bs)
                dense = min(t_gqa, t_pack)
                rec.update(mode=mode, context=length, sparsity=s, sdpa_gqa_ms=t_gqa, sdpa_packed_ms=t_pack,
                           dense_ms=dense, speedup_kernel=dense / rec["kernel_ms"],
                           speedup_with_gate=dense / rec["kernel_gate_ms"])
                records.append(rec)
                us = {key: f"{val * 1e3:.1f}" for key, val in rec.items() if key.endswith("_ms")}
                rows.append(
                    f"| {mode} | {length} | {s:.0%} | {rec['kept_blocks']}/{rec['n_blocks']} | {us['dense_ms']} | "
                    f"{us['kernel_ms']} ({rec['kernel_splits']}) | {us['kernel_default_ms']} | {us['kernel_mask_ms']} | "
                    f"{us['kernel_gate_ms']} | **{rec['speedup_kernel']:.2f}x** | {rec['speedup_with_gate']:.2f}x |"
                )
                print(rows[-1], flush=True)
    header = [
        "# Gated block-sparse decode attention vs dense SDPA",
        "",
        f"Device: **{name}**; torch {torch.__version__}, triton {triton.__version__}; {args.dtype}; batch 1, 1 query "
        f"token, {hq} query heads / {hkv} KV heads, head dim {d}, block {bs}. Median times in microseconds "
        "(graph = CUDA-graph replay, eager = plain launches). Dense = faster of SDPA `enable_gqa` and SDPA on the "
        "GQA-packed query. See the script's docstring for the columns.",
        "",
        "| timing | context | blocks skipped | kept / total | dense SDPA | kernel (splits) | kernel, default splits | "
        "kernel, bool-mask input | kernel + gate | speed-up (kernel) | speed-up (with gate) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n\nCommand: `python " + " ".join(sys.argv) + "`\n"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    out_path.with_suffix(".json").write_text(json.dumps({"device": name, "dtype": args.dtype, "results": records}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
