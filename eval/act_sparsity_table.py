"""Quality table: TEAL activation sparsity on SmolLM2-135M, uniform vs greedy thresholds.

Protocol:
  * thresholds: ``llmprune.runtime.actsparse.calibrate.calibrate_act`` on --nsamples x --seqlen tokens of the shipped
    C4 parquet (seed 0; the foundation protocol's 64 x 512 by default), once, greedy, at the highest level (the
    greedy path serves every lower level); the uniform rows use the same run's threshold tables (the same |x|
    samples) with every group at the level, so the two allocations differ only in the allocation;
  * WikiText-2 raw test joined with "\\n\\n", non-overlapping 512-token windows, first --windows windows, mean NLL
    (``llmprune.evaluate.perplexity``), every token of every window sparsified (``act_prefill``: a perplexity
    forward is a prefill; at decode only the new token is), as TEAL measures perplexity;
  * the measured fraction of zeroed linear-input entries is reported beside the target (the target is weighted
    by the weights each input selects, so the two differ).

Usage:
    OMP_NUM_THREADS=1 python eval/act_sparsity_table.py --shared ../shared --windows 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import llmprune
from llmprune.config import CalibConfig
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.runtime.actsparse.allocation import uniform_path
from llmprune.runtime.actsparse.apply import attach_act_sparsity, detach_act_sparsity
from llmprune.runtime.actsparse.calibrate import calibrate_act
from llmprune.runtime.actsparse.thresholds import ActThresholds, load_thresholds

LEVELS = (0.25, 0.4, 0.5)


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Activation sparsity (TEAL thresholds) on SmolLM2-135M", "",
             f"WikiText-2 perplexity, {meta['windows']} non-overlapping 512-token windows (first {meta['windows']}; "
             f"the foundation protocol uses 100), every token sparsified (prefill too). Thresholds calibrated on "
             f"{meta['nsamples']} x {meta['seqlen']} C4 tokens (seed 0), one greedy run at {max(LEVELS):.0%} (TEAL's "
             f"block-wise greedy path, step {meta['step']}, {meta.get('greedy_error', 'relative')} block error on "
             f"{meta['greedy_tokens']} tokens; lower "
             "levels read off the path); uniform rows use the same run's threshold tables with every group at the "
             "level. CPU, fp32, torch path (the exact reference). "
             f"Written by `eval/act_sparsity_table.py` on {meta['host']}.", "",
             "| allocation | target sparsity | measured zeroed entries | ppl | calib s | eval s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        zeroed = "-" if r["measured"] is None else f"{r['measured']:.3f}"
        lines.append(f"| {r['allocation']} | {r['target']:.2f} | {zeroed} | {r['ppl']:.2f} | "
                     f"{r.get('calib_s', '-')} | {r['eval_s']:.0f} |")
    errs = meta.get("block_error")
    if errs:
        g, u = errs["greedy"], errs["uniform"]
        lines += ["", f"Block output error at {max(LEVELS):.0%} (relative, mean over the 30 layers, calibration "
                  f"tokens): greedy {sum(g) / len(g):.4e}, uniform {sum(u) / len(u):.4e}; greedy lower in "
                  f"{sum(a <= b for a, b in zip(g, u))} of {len(g)} layers."]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="eval/results/act_sparsity.md")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--greedy-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2, help="calibration sequences per forward (the greedy "
                    "block error uses whole batches)")
    ap.add_argument("--step", type=float, default=0.025)
    ap.add_argument("--greedy-error", default="relative", choices=("relative", "teal"),
                    help="block error measure of the greedy allocation (llmprune.runtime.actsparse.calibrate)")
    ap.add_argument("--save-thresholds", default=None, help="also save the greedy thresholds in this directory")
    ap.add_argument("--thresholds", default=None, help="reuse greedy thresholds saved by --save-thresholds")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    shared = Path(args.shared)
    calib = CalibConfig(source=str(shared / "data" / "c4" / "c4_validation_2k.parquet"), nsamples=args.nsamples,
                        seqlen=args.seqlen, seed=0, batch_size=args.batch_size)
    tok = llmprune.load_tokenizer("smollm2-135m")
    ids = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
    model = llmprune.load("smollm2-135m", dtype="float32")
    meta = {"windows": args.windows, "nsamples": args.nsamples, "seqlen": args.seqlen, "step": args.step,
            "greedy_tokens": args.greedy_tokens, "greedy_error": args.greedy_error, "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "torch": torch.__version__}
    out = Path(args.out)
    rows: list[dict] = []
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    dense_rows = [r for r in old.get("rows", []) if r["allocation"] == "dense"]
    if dense_rows and old["meta"]["windows"] == args.windows:  # same windows: the dense row is reused
        rows.append(dense_rows[0])
    else:
        t0 = time.perf_counter()
        dense = perplexity(model, ids, seqlen=512, max_windows=args.windows, progress=False)
        rows.append({"allocation": "dense", "target": 0.0, "measured": None, "ppl": dense.ppl,
                     "eval_s": time.perf_counter() - t0})
    write(out, rows, meta)
    if args.thresholds:
        g = load_thresholds(args.thresholds)
        calib_s = g.info.get("seconds", "-")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = calibrate_act("smollm2-135m", max(LEVELS), Path(tmp), allocation="greedy", calibration=calib,
                                greedy_tokens=args.greedy_tokens, step=args.step, greedy_error=args.greedy_error,
                                device="cpu", dtype="float32",
                                progress=False)
            calib_s = round(time.perf_counter() - t0)
        g = res.thresholds
        if args.save_thresholds:
            g.save(args.save_thresholds)
    meta["block_error"] = g.info.get("block_error")
    levels, path = uniform_path()
    uniform = ActThresholds(g.quantiles, torch.tensor(levels), torch.tensor(path).expand(g.layers, -1, -1).clone(),
                            g.params, g.target, "uniform")
    for level in LEVELS:  # uniform and greedy side by side, so a cut-short run still compares them
        for allocation, th in (("uniform", uniform), ("greedy", g)):
            rt = attach_act_sparsity(model, th, level, prefill=True)
            rt.measure = True
            t0 = time.perf_counter()
            r = perplexity(model, ids, seqlen=512, max_windows=args.windows, progress=False)
            rows.append({"allocation": allocation, "target": level, "measured": rt.measured(), "ppl": r.ppl,
                         "eval_s": time.perf_counter() - t0, "calib_s": calib_s})
            detach_act_sparsity(model)
            write(out, rows, meta)
            print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
