"""Recovery table: one-shot 2:4 vs 2:4 + block recovery (llmprune.recover) on SmolLM2-135M.

Protocol (the foundation protocol, eval/foundation_table.py):
  * calibration: 64 samples x 512 tokens from the shipped C4 parquet, seed --seeds (default 0);
  * WikiText-2 raw test joined with "\\n\\n", non-overlapping 512-token windows, first --windows windows,
    mean NLL over all predicted tokens;
  * each row is produced by the real CLI (`llmprune compress ... [--recover block]`) in a subprocess, whose wall
    time and peak RSS are recorded.

Usage:
    OMP_NUM_THREADS=1 python eval/recovery_table.py --windows 100 --out eval/results/recovery.md [--append]
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

ROWS = [("wanda", "none"), ("wanda", "block"), ("sparsegpt", "none"), ("sparsegpt", "block")]


def variant(r: dict) -> str:
    """A row's extra recovery flags (from its command): rows of the same method differ by them."""
    if r["recover"] == "none" or "cmd" not in r:
        return ""
    return r["cmd"].split(f"--recover {r['recover']}", 1)[1].strip()


def key(r: dict) -> tuple:
    return r["method"], r["recover"], r.get("seed"), variant(r)


def options(r: dict) -> str:
    """The recovery options of a row, from its recorded config."""
    c = r.get("recover_config")
    if not c:
        return "-"
    extra = [f"{c[k]}" for k, d in (("scope", "separate"), ("mask", "fixed")) if c.get(k, d) != d]
    lr = c["lr"] if c["lr"] is not None else {"block": 2e-3, "e2e": 2e-4}[c["mode"]]  # RecoveryConfig.DEFAULT_LR
    return ", ".join([f"{c.get('loss', 'mse')} loss", f"{c['steps']} steps", f"lr {lr:g}", *extra])


def run_compress(method: str, recover: str, calib: Path, out: Path, args, seed: int) -> dict:
    cmd = [
        sys.executable, "-m", "llmprune", "compress", "smollm2-135m", "--method", method, "--sparsity", "2:4",
        "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(seed),
        "--device", "cpu", "--output", str(out), "-q",
    ]
    if recover != "none":
        cmd += ["--recover", recover, *args.recover_args.split()]
    wrapper = (  # a wrapper child per run so ru_maxrss is this run's peak, not the max over all runs
        "import resource,subprocess,sys,time;t=time.perf_counter();r=subprocess.run(sys.argv[1:]);"
        "print('@@', time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    load_before = os.getloadavg()[0]
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1].split()
    if int(line[3]) != 0:
        raise RuntimeError(f"compress failed: {res.stderr[-2000:]}")
    shown = ["OUT" if c == str(out) else c for c in cmd[3:]]
    return {"wall_s": float(line[1]), "peak_rss_mib": int(line[2]) / 1024, "cmd": " ".join(["llmprune", *shown]),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def loss_summary(meta: dict) -> dict | None:
    """Mean per-part block loss before/after over the layers (from llmprune.json)."""
    blocks = (meta.get("recovery") or {}).get("blocks") or []
    if not blocks:
        return None
    out = {}
    for part in ("attn", "mlp", "block"):
        rows = [b[part] for b in blocks if part in b]
        if rows:
            out[part] = {"before": sum(r["loss_before"] for r in rows) / len(rows),
                         "after": sum(r["loss_after"] for r in rows) / len(rows),
                         "ratio": sum(r["loss_after"] / r["loss_before"] for r in rows if r["loss_before"]) / len(rows)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="eval/results/recovery.md")
    ap.add_argument("--windows", type=int, default=100, help="first N WikiText-2 windows (0 = all)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seeds", default="0", help="comma list of calibration seeds")
    ap.add_argument("--rows", default="all", help="comma list like wanda:block,sparsegpt:none (default all)")
    ap.add_argument("--recover-args", default="", help="extra flags for the recovered rows, e.g. '--recover-steps 64'")
    ap.add_argument("--append", action="store_true", help="keep rows already in the JSON beside --out; skip them")
    ap.add_argument("--work", default=None, help="keep the checkpoints here (a finished one is reused, not re-run); "
                    "default: a temporary directory")
    ap.add_argument("--reuse-foundation", default=None, metavar="JSON",
                    help="take the dense and one-shot 2:4 rows (seed 0) from this foundation-table JSON (same protocol, "
                         "e.g. eval/RESULTS.json) instead of re-running them; they are marked in the table")
    args = ap.parse_args()
    max_windows = args.windows or None
    torch.set_grad_enabled(False)
    shared = Path(args.shared)
    calib = shared / "data" / "c4" / "c4_validation_2k.parquet"
    tok = llmprune.load_tokenizer("smollm2-135m")
    ids = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
    rows = ROWS if args.rows == "all" else [tuple(r.split(":", 1)) for r in args.rows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    json_path = Path(args.out).with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(json_path.read_text()) if args.append and json_path.exists() else []
    if args.reuse_foundation:
        have = {key(r) for r in results}
        for r in json.loads(Path(args.reuse_foundation).read_text()):
            k = ("dense", "none", None, "") if r["method"] == "dense" else (r["method"], "none", 0, "")
            if k not in have and (r["method"] == "dense" or (r["sparsity"] == "2:4" and k[0] in ("wanda", "sparsegpt"))):
                results.append({**r, "recover": "none", "seed": k[2], "source": args.reuse_foundation})
    done = {key(r) for r in results}
    t0 = time.perf_counter()
    if ("dense", "none", None, "") not in done:
        dense = perplexity(llmprune.load("smollm2-135m"), ids, args.seqlen, max_windows, progress=False)
        results.append({"method": "dense", "recover": "none", "seed": None, "ppl": dense.ppl,
                        "windows": dense.windows, "tokens": dense.tokens})
        print(f"dense ppl {dense.ppl:.3f}", flush=True)
        write_table(args, results, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for method, recover in rows:
                flags = " ".join(args.recover_args.split()) if recover != "none" else ""
                if (method, recover, seed, flags) in done:
                    continue
                slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in flags.replace("--recover-", ""))
                out = Path(args.work or tmp) / f"{method}-{recover}-{seed}{'-' + slug if slug else ''}"
                info_file = out.with_suffix(".run.json")
                if args.work and (out / "llmprune.json").is_file() and info_file.is_file():
                    info = json.loads(info_file.read_text())  # compressed by an earlier run of this script
                else:
                    info = run_compress(method, recover, calib, out, args, seed)
                    if args.work:
                        info_file.write_text(json.dumps(info) + "\n")
                meta = json.loads((out / "llmprune.json").read_text())
                res = perplexity(llmprune.load(out), ids, args.seqlen, max_windows, progress=False)
                row = {"method": method, "recover": recover, "seed": seed, "ppl": res.ppl, "windows": res.windows,
                       "tokens": res.tokens, "achieved": meta["sparsity"]["overall"],
                       "recover_config": (meta["recipe"].get("recover")), "losses": loss_summary(meta), **info}
                results.append(row)
                print(f"{method} 2:4 recover={recover} seed {seed}: ppl {res.ppl:.3f} (compress {info['wall_s']:.0f}s, "
                      f"peak RSS {info['peak_rss_mib']:.0f} MiB)", flush=True)
                if not args.work:
                    shutil.rmtree(out, ignore_errors=True)
                write_table(args, results, time.perf_counter() - t0)
    print(Path(args.out).read_text())


def write_table(args, results: list[dict], seconds: float) -> None:
    order = [("dense", "none")] + ROWS
    # stable: rows of one method and seed stay in the order they were run
    results = sorted(results, key=lambda r: (order.index((r["method"], r["recover"])), r.get("seed") or 0))
    dense = results[0]
    loads = [x for r in results for x in (r.get("load_before"), r.get("load_after")) if x is not None]
    lines = [
        "# Recovery results: SmolLM2-135M-Instruct 2:4, one-shot vs block recovery, WikiText-2 perplexity",
        "",
        f"Produced by `OMP_NUM_THREADS=1 python eval/recovery_table.py --windows {args.windows} --seeds {args.seeds}"
        + (f" --recover-args '{args.recover_args}'" if args.recover_args else "")
        + f" --out {args.out}` (last run {seconds / 60:.0f} min) on {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads for the perplexity; each compress subprocess inherits OMP_NUM_THREADS), "
        f"torch {torch.__version__}, fp32."
        + (f" 1-minute load average before/after each compress: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} "
           "cores shared with other jobs, so wall times are upper bounds." if loads else ""),
        "",
        f"- Calibration: {args.nsamples} samples x {args.seqlen} tokens from `../shared/data/c4/c4_validation_2k.parquet`, "
        f"seed(s) {args.seeds}.",
        f"- Perplexity: WikiText-2 raw test joined with \"\\n\\n\", non-overlapping {args.seqlen}-token windows, "
        f"{'first ' if args.windows else 'all '}{dense['windows']} windows ({dense['tokens']} predicted tokens).",
        "- Block recovery: `--recover block` (defaults unless the row's command says otherwise): per decoder block, "
        "attention then MLP reconstructed against the dense outputs with Adam, mask fixed. Loss columns: mean over "
        "layers of the per-part loss after / before recovery (the row's loss: `mse` = mean squared error, `token` = "
        "per-token squared error over the dense token's squared norm; not comparable across losses). Rows with "
        "different recovery options come from separate runs of this script (see the commands).",
        "",
        "| method | recovery | options | seed | achieved | WikiText-2 ppl | vs one-shot | attn loss after/before | "
        "mlp loss after/before | compress wall (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["method"], r.get("seed")): r["ppl"] for r in results if r["recover"] == "none"}
    for r in results:
        if r.get("source"):
            r = {**r, "method": f"{r['method']} †"}
        one = base.get((r["method"].rstrip(" †"), r.get("seed")))
        vs = f"{(r['ppl'] / one - 1) * 100:+.1f}%" if r["recover"] != "none" and one else "-"
        losses = r.get("losses") or {}
        la = f"{losses['attn']['ratio']:.3f}" if "attn" in losses else "-"
        lm = f"{losses['mlp']['ratio']:.3f}" if "mlp" in losses else "-"
        lines.append(
            f"| {r['method']} | {r['recover']} | {options(r)} | {'-' if r.get('seed') is None else r['seed']} | "
            f"{r['achieved']:.4f} | {r['ppl']:.2f} | {vs} | {la} | {lm} | "
            if "achieved" in r else f"| {r['method']} | - | - | - | - | {r['ppl']:.2f} | - | - | - | "
        )
        lines[-1] += (f"{r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} |" if "wall_s" in r else "- | - |")
    reused = sorted({r["source"] for r in results if r.get("source")})
    if reused:
        lines += ["", f"† taken from {', '.join(reused)} (the foundation table's run of the same protocol, seed 0), "
                  "not re-run here; its wall time was measured on an idle machine."]
    lines += ["", "Commands (per row):", ""] + [f"    {r['cmd']}" for r in results if "cmd" in r] + [""]
    notes = Path(args.out).with_suffix(".notes.md")  # hand-written notes (e.g. reduced-protocol probes), kept as is
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
