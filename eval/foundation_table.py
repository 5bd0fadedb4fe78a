"""Quality table: dense vs magnitude / Wanda / SparseGPT on SmolLM2-135M.

Protocol (one for all rows):
  * calibration: 64 samples x 512 tokens from the shipped C4 parquet, seed 0;
  * WikiText-2 raw test joined with "\\n\\n", non-overlapping 512-token windows,
    first --windows windows (default 100), mean NLL over all predicted tokens;
  * each pruned row is produced by the real CLI (`llmprune compress`) in a
    subprocess, whose wall time and peak RSS are recorded.

Usage:
    python eval/foundation_table.py --shared ../shared --out eval/RESULTS.md [--windows 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmprune
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text

ROWS = [
    ("magnitude", "0.5"), ("wanda", "0.5"), ("sparsegpt", "0.5"),
    ("magnitude", "4:8"), ("wanda", "4:8"), ("sparsegpt", "4:8"),
    ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
]


def run_compress(method: str, sparsity: str, calib: Path, out: Path, nsamples: int, seqlen: int) -> dict:
    cmd = [
        sys.executable, "-m", "llmprune", "compress", "smollm2-135m", "--method", method, "--sparsity", sparsity,
        "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--seed", "0",
        "--device", "cpu", "--output", str(out), "-q",
    ]
    # A wrapper child per run so ru_maxrss is this run's peak, not the max over all runs.
    wrapper = (
        "import resource,subprocess,sys,time;t=time.perf_counter();r=subprocess.run(sys.argv[1:]);"
        "print('@@', time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    load_before = os.getloadavg()[0]
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1].split()
    if int(line[3]) != 0:
        raise RuntimeError(f"compress failed: {res.stderr[-2000:]}")
    # The 1-minute load average around the run shows whether the timing was taken on an idle machine
    # (this run alone keeps it near the thread count).
    shown = ["OUT" if c == str(out) else c for c in cmd[3:]]  # the temp dir is gone after the run
    return {"wall_s": float(line[1]), "peak_rss_mib": int(line[2]) / 1024, "cmd": " ".join(["llmprune", *shown]),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="eval/RESULTS.md")
    ap.add_argument("--windows", type=int, default=100, help="first N WikiText-2 windows (0 = the whole test set)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rows", default="all", help="comma list like wanda:2:4,magnitude:0.5 (default all)")
    ap.add_argument("--append", action="store_true", help="keep rows already in the JSON beside --out; skip them")
    args = ap.parse_args()
    max_windows = args.windows or None
    torch.set_grad_enabled(False)
    shared = Path(args.shared)
    calib = shared / "data" / "c4" / "c4_validation_2k.parquet"
    tok = llmprune.load_tokenizer("smollm2-135m")
    ids = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
    rows = ROWS if args.rows == "all" else [tuple(r.split(":", 1)) for r in args.rows.split(",")]
    json_path = Path(args.out).with_suffix(".json")
    results = json.loads(json_path.read_text()) if args.append and json_path.exists() else []
    done = {(r["method"], r["sparsity"]) for r in results}
    t0 = time.perf_counter()
    if ("dense", "-") not in done:
        dense = perplexity(llmprune.load("smollm2-135m"), ids, args.seqlen, max_windows, progress=False)
        results.append({"method": "dense", "sparsity": "-", "ppl": dense.ppl, "windows": dense.windows,
                        "tokens": dense.tokens})
        print(f"dense ppl {dense.ppl:.3f}", flush=True)
        write_table(args, results, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        for method, sparsity in rows:
            if (method, sparsity) in done:
                continue
            out = Path(tmp) / f"{method}-{sparsity.replace(':', 'of')}"
            info = run_compress(method, sparsity, calib, out, args.nsamples, args.seqlen)
            meta = json.loads((out / "llmprune.json").read_text())
            res = perplexity(llmprune.load(out), ids, args.seqlen, max_windows, progress=False)
            row = {"method": method, "sparsity": sparsity, "ppl": res.ppl, "windows": res.windows,
                   "tokens": res.tokens, "achieved": meta["sparsity"]["overall"], **info}
            results.append(row)
            print(f"{method} {sparsity}: ppl {res.ppl:.3f} (achieved {row['achieved']:.4f}, "
                  f"compress {info['wall_s']:.0f}s, peak RSS {info['peak_rss_mib']:.0f} MiB)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            write_table(args, results, time.perf_counter() - t0)
    print(Path(args.out).read_text())


ORDER = [("dense", "-")] + ROWS


def load_sentence(results: list[dict]) -> str:
    loads = [x for r in results for x in (r.get("load_before"), r.get("load_after")) if x is not None]
    untracked = [f"{r['method']} {r['sparsity']}" for r in results if "wall_s" in r and "load_after" not in r]
    text = (f"1-minute load average before/after each compress: {min(loads):.1f}-{max(loads):.1f} "
            f"(this machine has {os.cpu_count()} cores). " if loads else "")
    if untracked:
        text += f"Rows without a recorded load ({', '.join(untracked)}) were timed on a shared machine: upper bounds."
    return text


def write_table(args, results: list[dict], seconds: float) -> None:
    results = sorted(results, key=lambda r: ORDER.index((r["method"], r["sparsity"])))
    dense = results[0]
    lines = [
        "# Foundation results: SmolLM2-135M-Instruct, WikiText-2 perplexity",
        "",
        f"Produced by `python eval/foundation_table.py --windows {args.windows}"
        f"{'' if args.rows == 'all' else ' --rows ' + args.rows} --out {args.out}` (last run {seconds / 60:.0f} min) on "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, fp32. "
        + load_sentence(results),
        "",
        f"- Calibration: {args.nsamples} samples x {args.seqlen} tokens from `../shared/data/c4/c4_validation_2k.parquet`, seed 0.",
        f"- Perplexity: WikiText-2 raw test joined with \"\\n\\n\", non-overlapping {args.seqlen}-token windows, "
        f"{'first ' if args.windows else 'all '}{dense['windows']} windows ({dense['tokens']} predicted tokens), mean NLL over all predicted tokens.",
        "- Unstructured 0.5 is per output row for magnitude and Wanda, per 128-column block for SparseGPT (its paper's choice).",
        "",
        "| method | sparsity | achieved | WikiText-2 ppl | compress wall (s) | compress peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    for r in results:
        lines.append(
            f"| {r['method']} | {r['sparsity']} | {num(r, 'achieved', '.4f')} | {r['ppl']:.2f} | "
            f"{num(r, 'wall_s', '.0f')} | {num(r, 'peak_rss_mib', '.0f')} |"
        )
    notes = getattr(args, "notes", [])
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    lines += ["", "Commands (per row):", ""]
    lines += [f"    {r['cmd']}" for r in results if "cmd" in r]
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")

if __name__ == "__main__":
    main()
