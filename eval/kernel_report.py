"""What the decode kernels compile to (no GPU needed), next to the bytes each call must move: a static roofline.

Every kernel is compiled ahead of time for sm_80 and sm_90 through its own launcher at the Llama-3-8B decode shapes
(``eval/kernel_compile.py``; the same builds ``tests/kernels/test_compiled.py`` checks). Per launch: registers (and
the CTAs/SM they allow), spills, shared memory, the global loads of the main loop by width, SASS instructions per
main-loop iteration, and the *issue ceiling*: the DRAM bytes one iteration streams divided by the cycles the SM
needs just to issue its instructions (4 warp instructions per cycle, every warp of the CTA runs the loop), times
SMs x boost clock. It ignores latency, so it is an upper bound on the bandwidth the loop can sustain, not a
prediction. The roofline part counts the bytes each call must move, ours vs dense, and the bandwidth each goal
needs if dense ran at the HBM peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s).

    python eval/kernel_report.py                 # prints, writes eval/results/kernel_report.md
    python eval/kernel_report.py --archs 90      # sm_90 only
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path

import kernel_compile as kc

HBM_TBS = {"H100 SXM": 3.35, "H200": 4.8}
GOALS = {"sparse24": 1.5, "kv_bitmap": 2.2, "gated": 6.0, "act_sparse": 1.6}
ACT_SPARSITY = 0.5  # input-sparse GEMV: fraction of x zeroed at the benchmark point
KV_SPARSITY = 0.7
GATED_SKIP, GATED_BLOCK = 0.9, 64
KV_LABEL = f"{KV_SPARSITY:.0%} / 32k, 32q/8kv, d128"
GATED_LABEL = f"{GATED_SKIP:.0%} skipped / 32k, block {GATED_BLOCK}"


def _loads(loop) -> str:
    if loop is None:
        return "-"
    parts = []
    for kind, widths in loop.global_loads().items():
        for bits, n in sorted(widths.items(), reverse=True):
            parts.append(f"{n}x{kind}.{bits}" if kind != "TMA" else f"{n}xTMA")
    return ", ".join(parts) or "none"


def _ceiling(c, bytes_per_iter: float) -> float | None:
    """TB/s the main loop could stream if every cycle issued 4 warp instructions (no latency)."""
    loop = c.main_loop
    if loop is None or not bytes_per_iter:
        return None
    _, sms, ghz, _ = kc.ARCHS[c.arch]
    cycles = c.num_warps * loop.size / kc.ISSUE_PER_CYCLE
    return bytes_per_iter / cycles * sms * ghz * 1e9 / 1e12


def _iter_bytes(kind: str, c) -> float:
    k = c.constexprs
    if kind == "sparse24":
        return k["BLOCK_N"] * (2 * k["BLOCK_G"] * 2 + k["BLOCK_G"] // 8 * 4)
    if kind == "act_sparse":  # the kept rows of the W^T tile, plus the x slice
        return (1 - ACT_SPARSITY) * k["BLOCK_K"] * k["BLOCK_N"] * 2 + k["BLOCK_M"] * k["BLOCK_K"] * 2
    if kind == "kv_bitmap":
        lay = kc.kv_bitmap_layout(kc.ATTN["context"], KV_SPARSITY, d=k["D"])
        meta = lay["meta"] if k.get("K_KEEP") else 12  # format 2 (derived offsets) or 1 (stored int32 offsets)
        return 2 * k["BLOCK_N"] * (lay["tiles"] * meta + lay["keep"] * 2)
    return 2 * k["BLOCK_N"] * k["HEAD_D"] * 2


def _config(kind: str, c) -> str:
    k = c.constexprs
    if kind == "sparse24":
        return f"bn={k['BLOCK_N']} bg={k['BLOCK_G']} split={k['SPLIT_K']} w={c.num_warps}"
    if kind == "act_sparse":
        return f"bn={k['BLOCK_N']} bk={k['BLOCK_K']} split={k['SPLIT_K']} w={c.num_warps}"
    if kind == "kv_bitmap":  # grid (B * Hkv, splits + 1): the last program takes the dense window
        fmt = 2 if k.get("K_KEEP") else 1  # bitmap format: 2 = offsets derived (not stored), 1 = stored offsets
        return f"bn={k['BLOCK_N']} splits={c.grid[1] - 1}+1 w={c.num_warps} fmt={fmt}"
    return f"bn={k['BLOCK_N']} splits={k['NUM_SPLITS']} w={c.num_warps}"


def roofline() -> list[dict]:
    """Bytes each benchmark call must move (ours vs dense), the ideal ratio and what each goal needs."""
    rows = []
    for label, (n, k) in kc.SPARSE24_SHAPES.items():
        io = 2 * k + 2 * n
        dense = 2 * n * k + io
        ours = n * (k // 2) * 2 + n * ((k // 2 + 15) // 16) * 4 + io
        rows.append(dict(kind="sparse24", label=f"M=1 {label}", point=f"2:4 M=1 {label}", dense=dense, ours=ours))
    for label, (n, k) in kc.SPARSE24_SHAPES.items():
        io = 2 * k + 2 * n
        ours = round((1 - ACT_SPARSITY) * 2 * n * k) + io
        rows.append(dict(kind="act_sparse", label=f"M=1 {label}", point=f"act-sparse {ACT_SPARSITY:.0%} M=1 {label}",
                         dense=2 * n * k + io, ours=ours))
    a = kc.ATTN
    dense_kv = 2 * a["batch"] * a["hkv"] * a["context"] * a["d"] * 2
    lay = kc.kv_bitmap_layout(a["context"], KV_SPARSITY, d=a["d"])
    per_tok = 2 * (lay["tiles"] * lay["meta"] + lay["keep"] * 2)  # format 2: bitmap words + kept values
    ours_kv = a["batch"] * a["hkv"] * (lay["n_compressed"] * per_tok + 2 * lay["window"] * a["d"] * 2)
    rows.append(dict(kind="kv_bitmap", label=KV_LABEL, point=f"bitmap KV {KV_SPARSITY:.0%} / {a['context'] // 1024}k", dense=dense_kv,
                     ours=ours_kv))
    nb = -(-a["context"] // GATED_BLOCK)
    sel = max(2, round((1 - GATED_SKIP) * nb))
    ours_g = a["batch"] * a["hkv"] * (sel * 2 * GATED_BLOCK * a["d"] * 2 + sel * 4)
    rows.append(dict(kind="gated", label=GATED_LABEL, point=f"gated {GATED_SKIP:.0%} skipped / {a['context'] // 1024}k", dense=dense_kv,
                     ours=ours_g))
    for r in rows:
        r["ratio"] = r["ours"] / r["dense"]
        r["ideal"] = 1 / r["ratio"]
        r["goal"] = GOALS[r["kind"]]
        r["need"] = {gpu: r["ratio"] * r["goal"] * bw for gpu, bw in HBM_TBS.items()}
    return rows


def build(archs) -> list[tuple[str, str, list]]:
    """``[(kind, shape label, [Compiled per arch...]), ...]`` for every benchmark point."""
    cases = [("sparse24", f"M=1 {label}", "sparse24_linear", dict(n=n, k=k))
             for label, (n, k) in kc.SPARSE24_SHAPES.items()]
    cases += [("sparse24", "M=16 4096x4096", "sparse24_linear", dict(n=4096, k=4096, m=16))]
    cases += [("act_sparse", f"M=1 {label}", "act_sparse_gemv", dict(n=n, k=k))
              for label, (n, k) in kc.SPARSE24_SHAPES.items()]
    cases += [("kv_bitmap", KV_LABEL, "kv_bitmap_attention", {})]
    cases += [("gated", GATED_LABEL, "gated_attention", {})]
    jobs = {(kind, label, arch): kc.job(mod, arch, **params) for kind, label, mod, params in cases for arch in archs}
    res = kc.compile_jobs(jobs.values())
    out = collections.defaultdict(list)
    for (kind, label, arch), jb in jobs.items():
        out[(kind, label)].append((arch, res[jb]))
    return [(kind, label, v) for (kind, label), v in out.items()]


def report(archs) -> str:
    import triton

    lines = ["# Decode kernels: compiled code and roofline", "",
             f"Generated by `python eval/kernel_report.py` (Triton {triton.__version__}, compiled ahead of time, no GPU). "
             "Static counts from the cubin; nothing here is a measurement on a GPU.", "",
             "## Compiled kernels (one row per launch; the launchers make one launch per call)", "",
             "| kernel | shape | arch | config | regs | CTAs/SM (regs) | spills | smem KB | main-loop SASS | SHFL | BAR "
             "| main-loop global loads | DRAM B / iter | issue ceiling TB/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    ceilings: dict[tuple[str, str], float] = {}
    for kind, label, per_arch in build(archs):
        for arch, launches in per_arch:
            if isinstance(launches, ValueError):
                lines.append(f"| {kind} | {label} | sm_{arch} | refused: {launches} | | | | | | | | | | |")
                continue
            for c in launches:
                loop = c.main_loop
                b = _iter_bytes(kind, c)
                ceil = _ceiling(c, b)
                if ceil is not None and arch == 90:
                    ceilings[(kind, label)] = ceil
                lines.append(
                    f"| {c.name.strip('_')} | {label} | sm_{arch} | {_config(kind, c)} | {c.regs} | {c.ctas_per_sm_regs} "
                    f"| {c.local_bytes + c.spill_ops} | {c.shared / 1024:.1f} | {loop.size if loop else '-'} "
                    f"| {loop.count('SHFL') if loop else '-'} | {loop.count('BAR') if loop else '-'} | {_loads(loop)} "
                    f"| {b:.0f} | {f'{ceil:.2f}' if ceil else '-'} |")
    lines += ["", "Spills: local-memory bytes + STL/LDL instructions. CTAs/SM (regs): what the register file allows "
              "(64K registers). Issue ceiling: (DRAM bytes per iteration) / (warps x SASS per iteration / 4) x SMs x "
              "boost clock (sm_80: A100, 108 SMs, 1.41 GHz; sm_90: H100/H200 SXM, 132 SMs, 1.98 GHz).", "",
              "## Roofline: bytes per call, ideal ratio, what the goal needs", "",
              "| point | dense MB | ours MB | ours / dense | ideal speedup | goal | needs TB/s (H100) | needs TB/s (H200) "
              "| sm_90 issue ceiling TB/s | ceiling / need (H200) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in roofline():
        ceil = ceilings.get((r["kind"], r["label"]), math.nan)
        need = r["need"]["H200"]
        lines.append(
            f"| {r['point']} | {r['dense'] / 1e6:.2f} | {r['ours'] / 1e6:.2f} | {r['ratio']:.1%} | {r['ideal']:.2f}x "
            f"| {r['goal']:g}x | {r['need']['H100 SXM']:.2f} | {need:.2f} | {ceil:.2f} | {ceil / need:.2f} |")
    lines += ["", "Needs: the bandwidth our kernel must sustain to reach the goal if dense ran at the HBM peak "
              "(ratio x goal x peak); the goal is only reachable when the issue ceiling is well above it (the issue "
              "asks for >= 1.5x). The ceiling excludes launch and prologue/epilogue cost, which matter at these "
              "sizes (a few us per call).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    ap.add_argument("--out", default=str(kc.ROOT / "eval" / "results" / "kernel_report.md"))
    args = ap.parse_args(argv)
    try:
        text = report([int(a) for a in args.archs.split(",")])
    except kc.CompileUnavailable as exc:
        print(f"cannot compile ahead of time: {exc}", file=sys.stderr)
        return 2
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
