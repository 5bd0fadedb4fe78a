"""The one prepared GPU run: kernel correctness at real shapes, then the three decode benchmarks, honestly timed.

For a session that gets one H100/H200 (torch >= 2.11, Triton >= 3.6, no network; it installs nothing). Run it
first and commit what it writes::

    python3 -m pip install --no-deps --no-build-isolation -e .   # makes `llmprune.kernels` importable
    python3 eval/gpu_suite.py                                      # ~5 min; eval/results/gpu_<device>.md + .json
    python3 eval/gpu_suite.py --dry-run                            # the plan, no GPU needed

1. **Correctness** at the Llama-3-8B decode shapes, fp16 and bf16, fresh random inputs (seed printed), outputs
   pre-filled with NaN (every entry must be written), against float64 references; each kernel is called twice
   (the in-kernel split combines reset their arrival counters) and must give the same bits.
2. **Benchmarks** on a reduced grid that holds every goal point (2:4 linear M=1 at 4096x4096, 14336x4096,
   4096x14336, fused QKV 6144x4096; bitmap KV 70% at 32k; gated 90% skipped at 32k), dense and ours in the same
   run. Times are medians over CUDA-graph replays of ``R`` calls, each call on its own copy of the big inputs,
   with ``R`` large enough that >= 4x the L2 size of *touched* bytes passes between two uses of one copy (cold L2);
   warm (``R`` calls on one copy) side by side. Achieved GB/s are bytes that must move / time, shown next to the
   measured device copy bandwidth. The 2:4 linear is also compared with PyTorch's own 2:4 path
   (``torch.sparse.to_sparse_semi_structured``, cuSPARSELt/CUTLASS); for attention the SDPA kernels that ran are
   listed.
3. **End to end**: greedy decode tokens/s at batch 1 of a randomly initialized Llama-3-8B-shaped model pruned 2:4,
   dense-with-zeros vs packed (goal >= 1.35x). Not included yet: the same model with the bitmap KV cache at 70% /
   32k and with gates at 90% (the kernels are measured alone above).

Exits 2 with one line when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
S24_SHAPES = [(4096, 4096, "q/o_proj"), (14336, 4096, "gate/up_proj"), (4096, 14336, "down_proj"),
              (6144, 4096, "fused qkv")]  # (N, K) = (out, in)
ATTN = dict(batch=1, hq=32, hkv=8, d=128)
GOALS = {"sparse24": 1.5, "kv_bitmap": 2.2, "gated": 6.0, "e2e": 1.35, "act_sparse": 1.6}
SECTIONS = ("correctness", "sparse24", "kv_bitmap", "gated", "e2e", "act_sparse")
FLUSH_FACTOR = 4  # bytes touched between two uses of one buffer copy, in L2 sizes
#: Where inputs and the correctness checks run ("cuda"; the CPU test runs the checks interpreted at small sizes).
DEVICE = "cuda"


# --------------------------------------------------------------------------- the plan


@dataclass
class Step:
    section: str  # "correctness" | "sparse24" | "kv_bitmap" | "gated" | "e2e"
    name: str
    params: dict = field(default_factory=dict)
    goal: float | None = None
    est_s: float = 15.0  # rough cost, so the run skips a step rather than overrun its time budget

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"[{self.section}] {self.name}" + (f" ({p})" if p else "") + (f"  goal >= {self.goal}x" if self.goal else "")


def plan(args) -> list[Step]:
    """Every step the run makes, in order (``--dry-run`` prints this list)."""
    steps: list[Step] = []
    only = set(args.only.split(",")) if args.only else None

    def want(section: str) -> bool:
        return only is None or section in only

    if want("correctness"):
        for dtype in args.dtypes:
            for n, k, what in S24_SHAPES + [(1024, 4096, "k/v_proj (split-K)")]:
                steps.append(Step("correctness", f"sparse24 {what} {n}x{k}", dict(n=n, k=k, m=1, dtype=dtype)))
            steps.append(Step("correctness", "sparse24 4096x4096 M=16", dict(n=4096, k=4096, m=16, dtype=dtype)))
            steps.append(Step("correctness", "kv_bitmap 32k 70%", dict(context=32768, sparsity=0.7, m=1, dtype=dtype)))
            steps.append(Step("correctness", "kv_bitmap 4k 70% M=4", dict(context=4096, sparsity=0.7, m=4, dtype=dtype)))
            steps.append(Step("correctness", "gated 32k 90% (-1 padded)", dict(context=32768, skip=0.9, dtype=dtype)))
            for n, k, what in S24_SHAPES[:3]:
                for m in (1, 4):
                    steps.append(Step("correctness", f"act_sparse {what} {n}x{k} M={m} 50%",
                                      dict(n=n, k=k, m=m, sparsity=0.5, dtype=dtype)))
    if want("sparse24"):
        for n, k, what in S24_SHAPES:
            steps.append(Step("sparse24", f"{what} {n}x{k} M=1", dict(n=n, k=k, m=1), GOALS["sparse24"]))
        steps.append(Step("sparse24", "q/o_proj 4096x4096 M=16", dict(n=4096, k=4096, m=16)))
    if want("kv_bitmap"):
        for sp in (0.7, 0.5):
            steps.append(Step("kv_bitmap", f"32k {sp:.0%}", dict(context=32768, sparsity=sp),
                              GOALS["kv_bitmap"] if sp == 0.7 else None))
    if want("gated"):
        for skip in (0.9, 0.5):
            steps.append(Step("gated", f"32k {skip:.0%} skipped", dict(context=32768, skip=skip, block=64),
                              GOALS["gated"] if skip == 0.9 else None))
    if want("act_sparse"):
        for n, k, what in S24_SHAPES:
            steps.append(Step("act_sparse", f"{what} {n}x{k} M=1 50% zeroed", dict(n=n, k=k, m=1, sparsity=0.5),
                              GOALS["act_sparse"]))
        for sp, m in ((0.4, 1), (0.9, 1), (0.5, 4)):
            steps.append(Step("act_sparse", f"q/o_proj 4096x4096 M={m} {sp:.0%} zeroed",
                              dict(n=4096, k=4096, m=m, sparsity=sp)))
    if want("e2e") and args.e2e_layers > 0:
        steps.append(Step("e2e", "Llama-3-8B-shaped (random init) greedy decode, batch 1, dense vs packed 2:4",
                          dict(layers=args.e2e_layers, prompt=128, new=128), GOALS["e2e"], est_s=150.0))
    return steps


# --------------------------------------------------------------------------- timing


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def copies_for(touched: int, one_copy: int, budget: int) -> int:
    """Buffer copies so that >= FLUSH_FACTOR x L2 of touched bytes pass between two uses of one copy."""
    want = 1 + math.ceil(FLUSH_FACTOR * l2_bytes() / max(touched, 1))
    return max(2, min(want, max(2, budget // max(one_copy, 1))))


def graph_time(fn, copies: int, reps: int = 15) -> float:
    """Median ms per call of ``fn(i)`` (``i`` = copy index) from CUDA-graph replays of ``fn(0) .. fn(copies-1)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):  # warm-up off the capture stream (compiles, allocates counters and workspaces)
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / copies)
    del g
    return statistics.median(times)


def eager_time_flushed(fn, reps: int = 25) -> float:
    """Median ms of ``fn()`` with FLUSH_FACTOR x L2 bytes written before each call (fallback when capture fails)."""
    flush = torch.empty(FLUSH_FACTOR * l2_bytes() // 4, dtype=torch.float32, device="cuda")
    fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def timed(fn, copies: int) -> dict:
    """``{"cold_ms", "warm_ms", "copies", "mode"}``: cold over ``copies`` buffer copies, warm on copy 0."""
    try:
        cold = graph_time(fn, copies)
        warm = graph_time(lambda i: fn(0), copies)
        return dict(cold_ms=cold, warm_ms=warm, copies=copies, mode="graph")
    except Exception as exc:  # noqa: BLE001 - e.g. a peer library that cannot be captured
        torch.cuda.synchronize()
        return dict(cold_ms=eager_time_flushed(lambda: fn(0)), warm_ms=graph_or_eager_warm(fn), copies=1,
                    mode=f"eager+flush ({type(exc).__name__})")


def graph_or_eager_warm(fn, reps: int = 25) -> float:
    fn(0)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(0)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device copy bandwidth (GB/s, bytes read + written), median of 10 copies of 1 GiB."""
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = graph_or_eager_warm(lambda i: dst.copy_(src), reps=10)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def free_budget(fraction: float = 0.3) -> int:
    free, _ = torch.cuda.mem_get_info()
    return int(free * fraction)


# --------------------------------------------------------------------------- inputs


def _dtype(name: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def sparse_weight(n: int, k: int, dtype, gen) -> torch.Tensor:
    from llmprune.sparsity import nm_mask

    w = torch.randn(n, k, device=DEVICE, dtype=torch.float32, generator=gen) * k**-0.5
    return (w * nm_mask(w.abs(), 2, 4)).to(dtype)


def bitmap_cache(context: int, sparsity: float, dtype, gen, window: int = 32):
    """``(args for kv_bitmap_attention, dense pruned K, dense pruned V)`` at ``context`` tokens (B=1, Llama-3-8B)."""
    from llmprune.formats.bitmap import keep_count
    from llmprune.runtime.kvcache.store import _BitmapStore

    B, H, d = ATTN["batch"], ATTN["hkv"], ATTN["d"]
    tc = context - window
    ks = _BitmapStore(B, H, d, keep_count(d, sparsity), dtype, DEVICE, capacity=tc)
    vs = _BitmapStore(B, H, d, keep_count(d, sparsity), dtype, DEVICE, capacity=tc)
    k = torch.randn(B, H, context, d, device=DEVICE, generator=gen).to(dtype)
    v = torch.randn(B, H, context, d, device=DEVICE, generator=gen).to(dtype)
    ks.append(k[:, :, :tc])
    vs.append(v[:, :, :tc])
    kw, vw = k[:, :, tc:].contiguous(), v[:, :, tc:].contiguous()
    args = [ks.bitmap, ks.offsets, ks.values, vs.bitmap, vs.offsets, vs.values, kw, vw, tc]
    kd = torch.cat([ks.dense(), kw], 2)
    vd = torch.cat([vs.dense(), vw], 2)
    return args, kd, vd, k, v


def ref_attention(q, k, v, allowed=None) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d)) v with GQA; ``allowed [B, Hkv, T]`` bool (None: all)."""
    B, hq, m, d = q.shape
    g = hq // k.shape[1]
    kf = k.double().repeat_interleave(g, 1)
    vf = v.double().repeat_interleave(g, 1)
    s = torch.einsum("bhmd,bhtd->bhmt", q.double(), kf) * d**-0.5
    T = k.shape[2]
    causal = torch.arange(T, device=q.device)[None, :] <= (T - m + torch.arange(m, device=q.device))[:, None]
    mask = causal[None, None]
    if allowed is not None:
        mask = mask & allowed.repeat_interleave(g, 1)[:, :, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhmt,bhtd->bhmd", p, vf)


def compare(y: torch.Tensor, ref: torch.Tensor, dtype) -> dict:
    """Error relative to |ref| + mean |ref| (rounding to ``dtype`` alone gives <= eps/2)."""
    y64 = y.double()
    scale = ref.abs() + ref.abs().mean()
    err = float(((y64 - ref).abs() / scale).max())
    eps = torch.finfo(dtype).eps
    return dict(max_err=err, tol=eps, finite=bool(torch.isfinite(y64).all()), ok=bool(torch.isfinite(y64).all())
                and err <= eps)


# --------------------------------------------------------------------------- correctness


def check_sparse24(p: dict, gen) -> dict:
    from llmprune.kernels.sparse24_linear import sparse24_linear

    from llmprune.formats.sparse24 import pack_24, unpack_24

    dtype = _dtype(p["dtype"])
    w = sparse_weight(p["n"], p["k"], dtype, gen)
    values, meta = pack_24(w)
    x = torch.randn(p["m"], p["k"], device=DEVICE, generator=gen).to(dtype)
    bias = torch.randn(p["n"], device=DEVICE, generator=gen).to(dtype)
    out = torch.full((p["m"], p["n"]), float("nan"), dtype=dtype, device=DEVICE)
    y = sparse24_linear(x, values, meta, bias, out=out).clone()
    again = sparse24_linear(x, values, meta, bias)
    ref = x.double() @ unpack_24(values, meta).double().t() + bias.double()
    res = compare(y, ref, dtype)
    res["repeat_identical"] = bool(torch.equal(y, again))
    res["ok"] = res["ok"] and res["repeat_identical"]
    return res


def act_sparse_inputs(m: int, k: int, sparsity: float, dtype, gen):
    """``(x [m, k], threshold)`` with a ``sparsity`` fraction of ``x``'s entries below the threshold."""
    x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
    a = x.float().abs().flatten().sort().values
    j = min(a.numel() - 1, round(sparsity * a.numel()))
    return x, float(a[j])


def check_act_sparse(p: dict, gen) -> dict:
    from llmprune.kernels.act_sparse_gemv import act_sparse_gemv

    dtype = _dtype(p["dtype"])
    x, t = act_sparse_inputs(p["m"], p["k"], p["sparsity"], dtype, gen)
    wt = (torch.randn(p["k"], p["n"], device=DEVICE, generator=gen) * p["k"] ** -0.5).to(dtype)
    bias = torch.randn(p["n"], device=DEVICE, generator=gen).to(dtype)
    out = torch.full((p["m"], p["n"]), float("nan"), dtype=dtype, device=DEVICE)
    y = act_sparse_gemv(x, wt, t, bias, out=out).clone()
    again = act_sparse_gemv(x, wt, t, bias)
    xd = x.double()
    ref = torch.where(xd.abs() < t, torch.zeros_like(xd), xd) @ wt.double() + bias.double()
    res = compare(y, ref, dtype)
    res["repeat_identical"] = bool(torch.equal(y, again))
    res["ok"] = res["ok"] and res["repeat_identical"]
    return res


def check_kv_bitmap(p: dict, gen) -> dict:
    from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention

    dtype = _dtype(p["dtype"])
    args, kd, vd, _, _ = bitmap_cache(p["context"], p["sparsity"], dtype, gen)
    q = torch.randn(ATTN["batch"], ATTN["hq"], p["m"], ATTN["d"], device=DEVICE, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    y = kv_bitmap_attention(q, *args, out=out).clone()
    again = kv_bitmap_attention(q, *args)
    res = compare(y, ref_attention(q, kd, vd), dtype)
    res["repeat_identical"] = bool(torch.equal(y, again))
    res["ok"] = res["ok"] and res["repeat_identical"]
    return res


def gated_inputs(context: int, skip: float, block: int, dtype, gen, pad: int = 0):
    B, H, d = ATTN["batch"], ATTN["hkv"], ATTN["d"]
    nb = -(-context // block)
    sel = max(2, round((1 - skip) * nb))
    q = torch.randn(B, ATTN["hq"], d, device=DEVICE, generator=gen).to(dtype)
    k = torch.randn(B, H, context, d, device=DEVICE, generator=gen).to(dtype)
    v = torch.randn(B, H, context, d, device=DEVICE, generator=gen).to(dtype)
    scores = torch.rand(B, H, nb, device=DEVICE, generator=gen)
    scores[..., 0] = scores[..., -1] = 2.0  # first and last block always kept, as the gates do
    idx = scores.topk(sel, -1).indices.to(torch.int32)
    if pad:
        idx = torch.cat([idx, torch.full((B, H, pad), -1, dtype=torch.int32, device=DEVICE)], -1)
    counts = torch.full((B, H), idx.shape[-1], dtype=torch.int32, device=DEVICE)
    return q, k, v, idx, counts, sel


def check_gated(p: dict, gen) -> dict:
    from llmprune.kernels.gated_attention import gated_attention

    dtype, block = _dtype(p["dtype"]), 64
    q, k, v, idx, counts, _ = gated_inputs(p["context"], p["skip"], block, dtype, gen, pad=5)
    out = torch.full_like(q, float("nan"))
    y = gated_attention(q, k, v, idx, block, counts=counts, out=out).clone()
    again = gated_attention(q, k, v, idx, block, counts=counts)
    nb = -(-p["context"] // block)
    blocks = torch.zeros(*idx.shape[:2], nb + 1, dtype=torch.bool, device=DEVICE)
    blocks.scatter_(-1, torch.where(idx >= 0, idx, nb).long(), True)
    allowed = blocks[..., :nb].repeat_interleave(block, -1)[..., : p["context"]]
    ref = ref_attention(q[:, :, None], k, v, allowed)[:, :, 0]
    res = compare(y, ref, dtype)
    res["repeat_identical"] = bool(torch.equal(y, again))
    res["ok"] = res["ok"] and res["repeat_identical"]
    return res


# --------------------------------------------------------------------------- benchmarks


def bench_sparse24(p: dict, gen, bw: float) -> dict:
    import torch.nn.functional as F
    from llmprune.kernels.sparse24_linear import heuristic_config, sparse24_linear

    from llmprune.formats.sparse24 import pack_24

    n, k, m, dtype = p["n"], p["k"], p["m"], torch.bfloat16
    w0 = sparse_weight(n, k, dtype, gen)
    dense_b, packed_b = n * k * 2, n * (k // 2) * 2 + n * ((k // 2 + 15) // 16) * 4
    io = (m * k + m * n) * 2
    budget = free_budget()
    r_dense = copies_for(dense_b, dense_b, budget // 2)
    r_ours = copies_for(packed_b, packed_b, budget // 4)
    ws = [w0] + [w0.clone() for _ in range(r_dense - 1)]
    p0 = pack_24(w0)
    packed = [p0] + [tuple(t.clone() for t in p0) for _ in range(r_ours - 1)]
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    y = torch.empty(m, n, device="cuda", dtype=dtype)
    row = dict(config=heuristic_config(m, n, k, x.device))
    row["dense"] = timed(lambda i: F.linear(x, ws[i]), r_dense)
    row["ours"] = timed(lambda i: sparse24_linear(x, *packed[i], out=y, check=False), r_ours)
    try:  # PyTorch's own 2:4 (cuSPARSELt / CUTLASS), the peer a user would otherwise pick
        from torch.sparse import to_sparse_semi_structured

        r_peer = copies_for(packed_b, packed_b, budget // 4)
        peers = [to_sparse_semi_structured(w0)] + [to_sparse_semi_structured(w0.clone()) for _ in range(r_peer - 1)]
        err = (F.linear(x, peers[0]).float() - F.linear(x, w0).float()).abs().max().item()
        row["torch_2:4"] = timed(lambda i: F.linear(x, peers[i]), r_peer)
        row["torch_2:4"].update(impl=type(peers[0]).__name__, max_abs_err_vs_dense=err)
    except Exception as exc:  # noqa: BLE001 - backend missing for this shape / build
        row["torch_2:4"] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    for key, nbytes in (("dense", dense_b + io), ("ours", packed_b + io), ("torch_2:4", packed_b + io)):
        t = row[key]
        if "cold_ms" in t:
            t["cold_GBps"] = nbytes / (t["cold_ms"] * 1e-3) / 1e9
            t["cold_share_of_copy_bw"] = t["cold_GBps"] / bw
    row["speedup_cold"] = row["dense"]["cold_ms"] / row["ours"]["cold_ms"]
    row["speedup_warm"] = row["dense"]["warm_ms"] / row["ours"]["warm_ms"]
    row["bytes"] = dict(dense=dense_b + io, ours=packed_b + io)
    return row


def bench_act_sparse(p: dict, gen, bw: float) -> dict:
    """Input-sparse GEMV (TEAL) vs dense ``F.linear`` (cuBLAS GEMV) on the same ``x``, bf16, cold L2."""
    import torch.nn.functional as F
    from llmprune.kernels.act_sparse_gemv import act_sparse_config, act_sparse_gemv

    n, k, m, dtype = p["n"], p["k"], p["m"], torch.bfloat16
    x, t = act_sparse_inputs(m, k, p["sparsity"], dtype, gen)
    w0 = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(dtype)
    kept = float((x.float().abs() >= t).any(0).float().mean())  # rows of W^T the kernel must read
    dense_b, io = n * k * 2, (m * k + m * n) * 2
    ours_b = round(kept * dense_b)
    budget = free_budget()
    r_dense = copies_for(dense_b, dense_b, budget // 2)
    r_ours = copies_for(max(ours_b, 1), dense_b, budget // 2)
    ws = [w0] + [w0.clone() for _ in range(r_dense - 1)]
    wts = [w0.t().contiguous() for _ in range(r_ours)]  # W^T row-major, as the runtime lays it out
    y = torch.empty(m, n, device="cuda", dtype=dtype)
    row = dict(config=act_sparse_config(m, n, k, num_sms=torch.cuda.get_device_properties(0).multi_processor_count),
               kept_inputs=kept)
    row["dense"] = timed(lambda i: F.linear(x, ws[i]), r_dense)
    row["ours"] = timed(lambda i: act_sparse_gemv(x, wts[i], t, out=y, check=False), r_ours)
    for key, nbytes in (("dense", dense_b + io), ("ours", ours_b + io)):
        tm = row[key]
        tm["cold_GBps"] = nbytes / (tm["cold_ms"] * 1e-3) / 1e9
        tm["cold_share_of_copy_bw"] = tm["cold_GBps"] / bw
    row["speedup_cold"] = row["dense"]["cold_ms"] / row["ours"]["cold_ms"]
    row["speedup_warm"] = row["dense"]["warm_ms"] / row["ours"]["warm_ms"]
    row["bytes"] = dict(dense=dense_b + io, ours=ours_b + io)
    return row


def sdpa_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` runs (which SDPA backend ran)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for evt in prof.key_averages():
        key = evt.key
        if re.search(r"flash|fmha|attention|attn|cudnn|gemm|softmax|sm\d\d|kernel", key, re.I) and key not in names:
            names.append(key)
    return names[:8]


def bench_dense_attention(q4, k_copies, v_copies, copies) -> dict:
    """SDPA over the whole dense cache, GQA via ``enable_gqa`` and via a GQA-packed query; the faster is dense."""
    import torch.nn.functional as F

    B, hq, _, d = q4.shape
    hkv = k_copies[0].shape[1]
    qp = q4.reshape(B, hkv, hq // hkv, d)
    out = {}
    out["sdpa_enable_gqa"] = timed(lambda i: F.scaled_dot_product_attention(q4, k_copies[i], v_copies[i],
                                                                            enable_gqa=True), copies)
    out["sdpa_gqa_packed"] = timed(lambda i: F.scaled_dot_product_attention(qp, k_copies[i], v_copies[i]), copies)
    out["sdpa_kernels_enable_gqa"] = sdpa_kernels(
        lambda: F.scaled_dot_product_attention(q4, k_copies[0], v_copies[0], enable_gqa=True))
    out["sdpa_kernels_gqa_packed"] = sdpa_kernels(lambda: F.scaled_dot_product_attention(qp, k_copies[0], v_copies[0]))
    best = min(("sdpa_enable_gqa", "sdpa_gqa_packed"), key=lambda key: out[key]["cold_ms"])
    out["best"] = best
    return out


def bench_kv_bitmap(p: dict, gen, bw: float) -> dict:
    from llmprune.kernels.kv_bitmap_attention import kv_bitmap_attention

    dtype = torch.bfloat16
    args, _, _, k, v = bitmap_cache(p["context"], p["sparsity"], dtype, gen)
    dense_b = 2 * k.numel() * 2
    ours_b = sum(t.numel() * t.element_size() for t in args[:8] if t is not None)  # format 2: no offsets (None)
    budget = free_budget()
    r_dense = copies_for(dense_b, dense_b, budget // 2)
    r_ours = copies_for(ours_b, ours_b, budget // 2)
    ks, vs = [k] + [k.clone() for _ in range(r_dense - 1)], [v] + [v.clone() for _ in range(r_dense - 1)]
    caches = [args] + [[None if t is None else t.clone() for t in args[:8]] + [args[8]] for _ in range(r_ours - 1)]
    q4 = torch.randn(ATTN["batch"], ATTN["hq"], 1, ATTN["d"], device="cuda", generator=gen).to(dtype)
    o = torch.empty_like(q4)
    row = dict(bytes=dict(dense=dense_b, ours=ours_b, ratio=ours_b / dense_b))
    row["dense"] = bench_dense_attention(q4, ks, vs, r_dense)
    row["ours"] = timed(lambda i: kv_bitmap_attention(q4, *caches[i], out=o), r_ours)
    _finish_attention(row, bw)
    return row


def bench_gated(p: dict, gen, bw: float) -> dict:
    from llmprune.kernels.gated_attention import gated_attention

    dtype, block = torch.bfloat16, p["block"]
    q, k, v, idx, counts, sel = gated_inputs(p["context"], p["skip"], block, dtype, gen)
    dense_b = 2 * k.numel() * 2
    ours_b = ATTN["batch"] * ATTN["hkv"] * sel * 2 * block * ATTN["d"] * 2 + idx.numel() * 4
    budget = free_budget()
    r_dense = copies_for(dense_b, dense_b, budget // 2)
    r_ours = copies_for(ours_b, dense_b, budget // 2)  # copies of the whole cache; only the selected blocks move
    n_copies = max(r_dense, r_ours)
    ks = [k] + [k.clone() for _ in range(n_copies - 1)]
    vs = [v] + [v.clone() for _ in range(n_copies - 1)]
    o = torch.empty_like(q)
    row = dict(bytes=dict(dense=dense_b, ours=ours_b, ratio=ours_b / dense_b), selected_blocks_per_head=sel)
    row["dense"] = bench_dense_attention(q[:, :, None], ks, vs, r_dense)
    row["ours"] = timed(lambda i: gated_attention(q, ks[i], vs[i], idx, block, counts=counts, out=o), r_ours)
    _finish_attention(row, bw)
    return row


def bench_e2e(p: dict, gen, bw: float) -> dict:
    """Greedy decode tokens/s at batch 1 (one step captured in a CUDA graph, static KV cache; eval/bench_sparse24.py),
    of a randomly initialized Llama-3-8B-shaped model pruned 2:4: dense-with-zeros, then packed in place."""
    import bench_sparse24 as bs
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmprune
    from llmprune.runtime.sparse24 import pack_model

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=p["layers"], num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=DEVICE)))
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16).eval()
    llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), device="cuda", progress=False)
    prompt = torch.randint(100, 1000, (1, p["prompt"]), device="cuda", generator=gen)
    greedy = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    with torch.no_grad():
        tokens_dense = model.generate(prompt, **greedy)
    dense_tps = bs.decode_graph(model, prompt, p["new"])
    names = pack_model(model)
    with torch.no_grad():
        tokens_packed = model.generate(prompt, **greedy)
    packed_tps = bs.decode_graph(model, prompt, p["new"])
    return dict(dense_tokens_per_s=dense_tps, packed_tokens_per_s=packed_tps, speedup_cold=packed_tps / dense_tps,
                packed_linears=len(names), first_16_tokens_identical=bool(torch.equal(tokens_dense, tokens_packed)),
                note="weights stream from HBM every step (8B bf16 >> L2): cold by construction")


def _finish_attention(row: dict, bw: float) -> None:
    dense = row["dense"][row["dense"]["best"]]
    for t, nbytes in ((dense, row["bytes"]["dense"]), (row["ours"], row["bytes"]["ours"])):
        t["cold_GBps"] = nbytes / (t["cold_ms"] * 1e-3) / 1e9
        t["cold_share_of_copy_bw"] = t["cold_GBps"] / bw
    row["speedup_cold"] = dense["cold_ms"] / row["ours"]["cold_ms"]
    row["speedup_warm"] = dense["warm_ms"] / row["ours"]["warm_ms"]


# --------------------------------------------------------------------------- run and write


def environment() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return dict(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_GB=round(p.total_memory / 1e9, 1), l2_MB=round(l2_bytes() / 2**20, 1), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def device_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H20|A100|B200|L40S?|GH200)", name, re.I)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).lower()


def run(args) -> dict:
    steps = plan(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    env = environment()
    print(f"gpu_suite on {env['device']} (sm_{env['capability']}, {env['sms']} SMs, L2 {env['l2_MB']} MB), "
          f"torch {env['torch']}, triton {env['triton']}, seed {seed}", flush=True)
    t0 = time.time()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    results = dict(environment=env, seed=seed, copy_GBps=bw, flush_factor=FLUSH_FACTOR, steps=[])
    funcs = dict(sparse24=bench_sparse24, kv_bitmap=bench_kv_bitmap, gated=bench_gated, e2e=bench_e2e,
                 act_sparse=bench_act_sparse)
    checks = {"sparse24": check_sparse24, "kv_bitmap": check_kv_bitmap, "gated": check_gated,
              "act_sparse": check_act_sparse}
    for st in steps:
        if time.time() - t0 + st.est_s > args.budget_s:
            results["steps"].append(dict(step=st.describe(), skipped=f"time budget {args.budget_s} s spent"))
            continue
        ts = time.time()
        try:
            if st.section == "correctness":
                res = checks[st.name.split()[0]](st.params, gen)
            else:
                res = funcs[st.section](st.params, gen, bw)
        except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not lose the rest
            res = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        res.update(section=st.section, name=st.name, params=st.params, goal=st.goal, seconds=round(time.time() - ts, 1))
        results["steps"].append(res)
        print(summary_line(res), flush=True)
        torch.cuda.empty_cache()
    results["seconds"] = round(time.time() - t0, 1)
    return results


def summary_line(r: dict) -> str:
    head = f"[{r.get('section')}] {r.get('name')}"
    if "error" in r:
        return f"{head}: ERROR {r['error']}"
    if "skipped" in r:
        return f"{head}: skipped ({r['skipped']})"
    if r["section"] == "correctness":
        return (f"{head}: {'ok' if r['ok'] else 'FAIL'} max err {r['max_err']:.2e} (tol {r['tol']:.1e}), "
                f"repeat identical {r['repeat_identical']}")
    if r["section"] == "e2e":
        met = "MET" if r["speedup_cold"] >= r["goal"] else "not met"
        return (f"{head}: dense {r['dense_tokens_per_s']:.1f} tok/s, packed 2:4 {r['packed_tokens_per_s']:.1f} tok/s -> "
                f"{r['speedup_cold']:.2f}x, goal {r['goal']}x {met}; {r['packed_linears']} linears packed, first 16 "
                f"greedy tokens identical: {r['first_16_tokens_identical']}")
    dense = r["dense"] if r["section"] in ("sparse24", "act_sparse") else r["dense"][r["dense"]["best"]]
    goal = f", goal {r['goal']}x {'MET' if r['speedup_cold'] >= r['goal'] else 'not met'}" if r.get("goal") else ""
    peer = ""
    if r["section"] == "sparse24" and "cold_ms" in r.get("torch_2:4", {}):
        peer = f", torch 2:4 {r['torch_2:4']['cold_ms'] * 1e3:.1f} us"
    return (f"{head}: dense {dense['cold_ms'] * 1e3:.1f} us cold / {dense['warm_ms'] * 1e3:.1f} warm, ours "
            f"{r['ours']['cold_ms'] * 1e3:.1f} cold / {r['ours']['warm_ms'] * 1e3:.1f} warm -> "
            f"{r['speedup_cold']:.2f}x cold ({r['speedup_warm']:.2f}x warm){peer}; ours "
            f"{r['ours']['cold_GBps']:.0f} GB/s = {r['ours']['cold_share_of_copy_bw']:.0%} of copy{goal}")


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# GPU suite: {env['device']}", "",
             f"`python eval/gpu_suite.py` on {env['device']} (sm_{env['capability']}, {env['sms']} SMs, "
             f"L2 {env['l2_MB']} MB), torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
             f"{env['date']}; seed {res['seed']}; {res['seconds']} s. Copy bandwidth {res['copy_GBps']:.0f} GB/s "
             f"(read + write). Cold = CUDA-graph replay over buffer copies with >= {res['flush_factor']}x L2 of "
             "touched bytes between two uses of one copy; warm = the same replay on one copy; medians.", ""]
    for section, title in (("correctness", "Correctness (float64 references, NaN-poisoned outputs)"),
                           ("sparse24", "2:4 linear (bf16, x @ W^T)"), ("kv_bitmap", "Bitmap-KV decode attention"),
                           ("gated", "Gated block-sparse decode attention"),
                           ("e2e", "End-to-end decode (batch 1)"),
                           ("act_sparse", "Input-sparse GEMV (TEAL activation sparsity, bf16, vs dense F.linear)")):
        rows = [r for r in res["steps"] if r.get("section") == section]
        if not rows:
            continue
        lines += [f"## {title}", ""] + [f"- {summary_line(r)}" for r in rows] + [""]
        for r in rows:
            if section in ("kv_bitmap", "gated") and "dense" in r:
                d = r["dense"]
                lines.append(f"  - {r['name']}: SDPA kernels (enable_gqa): {', '.join(d['sdpa_kernels_enable_gqa'])}; "
                             f"(packed query): {', '.join(d['sdpa_kernels_gqa_packed'])}; dense = {d['best']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--e2e-layers", type=int, default=32, help="decoder layers of the end-to-end model (0: skip)")
    ap.add_argument("--dtypes", default="fp16,bf16", type=lambda s: [x for x in s.split(",") if x],
                    help="correctness dtypes (default fp16,bf16)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip steps that would end past this many seconds (default 420: the run stays under 8 min)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for gpu_<device>.md / .json")
    args = ap.parse_args(argv)
    for d in args.dtypes:
        if d not in ("fp16", "bf16"):
            ap.error(f"--dtypes: {d!r} is not fp16 or bf16")
    if args.only and not set(args.only.split(",")) <= set(SECTIONS):
        ap.error(f"--only: unknown section in {args.only!r}")
    steps = plan(args)
    if args.dry_run:
        print(f"gpu_suite plan: {len(steps)} steps, time budget {args.budget_s:.0f} s, cold L2 = "
              f">= {FLUSH_FACTOR}x L2 of touched bytes between two uses of a buffer copy")
        for st in steps:
            print("  " + st.describe())
        return 0
    if not torch.cuda.is_available():
        print("gpu_suite: needs a CUDA GPU (torch.cuda.is_available() is False); try --dry-run", file=sys.stderr)
        return 2
    res = run(args)
    slug = device_slug(res["environment"]["device"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_{slug}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"gpu_{slug}.md").write_text(markdown(res))
    print(f"wrote {out / f'gpu_{slug}.md'} and .json ({res['seconds']} s)")
    failed = [r for r in res["steps"] if r.get("section") == "correctness" and not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
