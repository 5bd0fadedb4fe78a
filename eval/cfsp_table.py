"""Table: CFSP structured pruning of SmolLM2-135M -- parameters, perplexity, CPU decode latency.

Protocol:
  * calibration: --nsamples x --seqlen tokens from the shipped C4 parquet, seed 0 (foundation sampling);
  * one calibration pass of the dense model gives the coarse (angular distance) and fine (activation
    norm) statistics; every row reuses them (they do not depend on the target sparsity), through
    ``llmprune.prune.methods.cfsp.apply_cfsp`` -- the same code ``llmprune compress --method cfsp`` runs;
  * WikiText-2 raw test joined with "\\n\\n", non-overlapping --seqlen windows, first --windows windows;
  * rows: uniform allocation (baseline) vs coarse allocation at 10/20/30% of the FFN parameters, coarse
    with LoRA recovery, and coarse 30% with attention head groups pruned too (--prune-heads);
  * latency: greedy decode, batch 1, 128 new tokens (min_new_tokens forces the full length), fp32 on CPU,
    dense and pruned runs interleaved, median of --reps.

Rows are appended to the output (markdown + json) as soon as they are measured.

Usage:
    python eval/cfsp_table.py --shared ../shared --out eval/results/cfsp.md [--windows 40] [--nsamples 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import llmprune
from llmprune.api import PruneContext
from llmprune.calibration import load_calibration
from llmprune.calibration.blockstats import LayerStats, collect_stats
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.model.access import attn_of, decoder_layers, mlp_of
from llmprune.model.structured import layer_sizes
from llmprune.prune.methods.cfsp import CFSPConfig, apply_cfsp


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    ffn = sum(p.numel() for layer in decoder_layers(model) for p in mlp_of(layer).parameters())
    attn = sum(p.numel() for layer in decoder_layers(model) for p in attn_of(layer).parameters())
    return {"total": total, "ffn": ffn, "attn": attn}


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, eos: int) -> float:
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
    return time.perf_counter() - t


def latency(models: dict, tok, new_tokens: int, reps: int) -> dict:
    prompt = tok("The history of the city begins", return_tensors="pt").input_ids
    for m in models.values():  # warm-up
        decode_seconds(m, prompt, 8, tok.eos_token_id)
    times = {k: [] for k in models}
    for _ in range(reps):  # interleaved so load changes on a shared machine hit every model alike
        for k, m in models.items():
            times[k].append(decode_seconds(m, prompt, new_tokens, tok.eos_token_id))
    return {k: statistics.median(v) for k, v in times.items()}


def write(out: Path, args, rows: list[dict], lat: dict, dense: dict, started: float) -> None:
    order = {"uniform": 0, "coarse": 1}
    rows = sorted(rows, key=lambda r: (r["sparsity"], r["heads"], r["recover_steps"] > 0, order[r["allocation"]]))
    load_end = getattr(args, "load_end", None) or os.getloadavg()[0]  # --merge keeps the measured runs' value
    lines = [
        "# CFSP structured pruning: SmolLM2-135M-Instruct",
        "",
        f"Produced by `python eval/cfsp_table.py --windows {args.windows} --nsamples {args.nsamples} "
        f"--recover-steps {args.recover_steps}` in {(time.perf_counter() - started) / 60:.0f} min on "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, fp32. "
        f"1-minute load average at the start / end: {args.load_start:.1f} / {load_end:.1f} "
        f"({os.cpu_count()} cores; this job alone keeps it near the thread count). Latencies are interleaved medians.",
        "",
        f"- Calibration: {args.nsamples} samples x {args.seqlen} tokens from `../shared/data/c4/c4_validation_2k.parquet`, "
        "seed 0; one pass of the dense model gives the statistics every row uses.",
        f"- Perplexity: WikiText-2 raw test joined with \"\\n\\n\", non-overlapping {args.seqlen}-token windows, first "
        f"{args.windows} windows, mean NLL over all predicted tokens (dense: {dense['ppl']:.2f}).",
        "- Sparsity = fraction of the *prunable* parameters removed: FFN `gate/up/down_proj` of every layer "
        "(plus `q/k/v/o_proj` for the heads row). Embeddings (tied with `lm_head`) and norms are never pruned, so the "
        "fraction of all parameters removed is smaller (column `params`).",
        f"- Recovery: LoRA on every linear of every layer, per-layer rank ~ coarse importance (mean 8), "
        f"{args.recover_steps} steps x 1 sequence of {args.seqlen} tokens from the calibration set, lr 2e-4 cosine, merged.",
        "",
        "| allocation | sparsity | recovery | params (M) | removed of all | FFN sizes min-max | WikiText-2 ppl |",
        "|---|---|---|---|---|---|---|",
        f"| dense | - | - | {dense['params']['total'] / 1e6:.2f} | 0.0% | 1536 | {dense['ppl']:.2f} |",
    ]
    for r in rows:
        lines.append(
            f"| {r['allocation']}{' + heads' if r['heads'] else ''} | {r['sparsity']:.0%} | "
            f"{r['recover_steps'] or '-'} | {r['params']['total'] / 1e6:.2f} | "
            f"{1 - r['params']['total'] / dense['params']['total']:.1%} | {min(r['ffn_sizes'])}-{max(r['ffn_sizes'])} | "
            f"{r['ppl']:.2f} |"
        )
    if lat:
        lines += ["", f"CPU decode latency, batch 1, {args.new_tokens} new tokens (median of {args.reps}):", "",
                  "| model | seconds | tokens/s | speed-up vs dense |", "|---|---|---|---|"]
        for k, v in lat.items():
            lines.append(f"| {k} | {v:.2f} | {args.new_tokens / v:.1f} | {lat['dense'] / v:.2f}x |")
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    minutes = (time.perf_counter() - started) / 60
    out.with_suffix(".json").write_text(
        json.dumps({"dense": dense, "rows": rows, "latency_s": lat, "minutes": minutes,
                    "load_start": args.load_start, "load_end": load_end}, indent=2) + "\n")


def latency_sweep(args, dense_model, stats, ctx, tok, out: Path, started: float) -> None:
    """Decode latency of CFSP models at several sparsities, interleaved with dense, against weight bytes.

    At batch 1 a decode step reads every weight once (the tied embedding as ``lm_head``), so on a
    bandwidth-bound CPU the speed-up should track the ratio of parameter counts; the table shows both.
    """
    models, params = {"dense": dense_model}, {"dense": param_counts(dense_model)["total"]}
    for spec in args.latency_sweep.split(","):
        allocation, ratio, *flags = spec.split(":")
        name = f"cfsp {allocation} {float(ratio):.0%}{' + heads' if 'heads' in flags else ''}"
        model = copy.deepcopy(dense_model)
        apply_cfsp(model, CFSPConfig(sparsity=float(ratio), allocation=allocation, prune_heads="heads" in flags,
                                     max_ratio=0.8, round_to=8), stats, ctx)
        models[name], params[name] = model, param_counts(model)["total"]
    lat = latency(models, tok, args.new_tokens, args.reps)
    lines = [
        "# CFSP decode latency vs weight bytes: SmolLM2-135M-Instruct on CPU",
        "",
        f"Produced by `python eval/cfsp_table.py --latency-sweep {args.latency_sweep} --nsamples {args.nsamples} "
        f"--reps {args.reps} --out {args.out}` on {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, fp32; 1-minute load average at the start / end: {args.load_start:.1f} / "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} cores).",
        "",
        f"Greedy decode, batch 1, {args.new_tokens} new tokens after a 6-token prompt, median of {args.reps} runs "
        "interleaved across models. Calibration statistics as in `cfsp.md`. `sparsity` is the share of the "
        "prunable parameters removed (FFN, plus attention with `+ heads`); `weights read` is the model's parameter "
        "count relative to dense (every weight, the tied embedding as `lm_head`, is read once per decoded token).",
        "",
        "| model | params (M) | weights read vs dense | seconds | tokens/s | speed-up vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in lat.items():
        lines.append(f"| {k} | {params[k] / 1e6:.2f} | {params[k] / params['dense']:.3f} | {v:.2f} | "
                     f"{args.new_tokens / v:.1f} | {lat['dense'] / v:.2f}x |")
    out.write_text("\n".join(lines + [""]))
    out.with_suffix(".json").write_text(json.dumps({"latency_s": lat, "params": params, "reps": args.reps,
                                                    "minutes": (time.perf_counter() - started) / 60}, indent=2) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="eval/results/cfsp.md")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--recover-steps", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stats-cache", default=None, help="reuse the calibration statistics saved at this path")
    ap.add_argument("--rows", default=None,
                    help="only these rows, e.g. coarse:0.2:0,uniform:0.2:0 (allocation:sparsity:recover_steps); no latency")
    ap.add_argument("--latency-sweep", default=None, metavar="SPEC",
                    help="only decode latency vs dense, e.g. coarse:0.3,coarse:0.45,coarse:0.3:heads; written to --out")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="render --out from the .json files of earlier (partial) runs instead of measuring")
    args = ap.parse_args()
    args.load_start = os.getloadavg()[0]
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        args.load_start = max(part.get("load_start", float("nan")) for part in parts)
        args.load_end = max(part.get("load_end", float("nan")) for part in parts)
        rows = list({(r["allocation"], r["sparsity"], r["recover_steps"], r["heads"]): r
                     for part in reversed(parts) for r in part["rows"]}.values())
        lat = next((part["latency_s"] for part in parts if part["latency_s"]), {})
        write(Path(args.out), args, rows, lat, parts[0]["dense"], time.perf_counter() - sum(
            part.get("minutes", 0) for part in parts) * 60)
        return
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    out = Path(args.out)
    shared = Path(args.shared)
    tok = llmprune.load_tokenizer("smollm2-135m")
    dense_model = llmprune.load("smollm2-135m", dtype="float32")
    ids = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
    calib = load_calibration(
        llmprune.CalibConfig(source=str(shared / "data" / "c4" / "c4_validation_2k.parquet"), nsamples=args.nsamples,
                             seqlen=args.seqlen, seed=0), tok, dense_model)
    ctx = PruneContext(calib, torch.device("cpu"), batch_size=8, progress=False)
    t = time.perf_counter()
    cache = Path(args.stats_cache) if args.stats_cache else None
    if cache is not None and cache.is_file():
        stats = [LayerStats(**d) for d in torch.load(cache, weights_only=True)]
    else:
        stats = collect_stats(dense_model, calib, ctx.device, 8, heads=True, progress=False)
        if cache is not None:
            torch.save([vars(s) for s in stats], cache)
    print(f"statistics pass {time.perf_counter() - t:.0f}s; importance {[round(s.importance, 3) for s in stats]}", flush=True)
    if args.latency_sweep:
        return latency_sweep(args, dense_model, stats, ctx, tok, out, started)
    dense = {"ppl": perplexity(dense_model, ids, args.seqlen, args.windows, progress=False).ppl,
             "params": param_counts(dense_model), "importance": [s.importance for s in stats]}
    print(f"dense ppl {dense['ppl']:.3f}", flush=True)
    rows: list[dict] = []
    lat: dict = {}
    plan = [("coarse", 0.3, 0, False), ("uniform", 0.3, 0, False), ("coarse", 0.3, 0, True), "latency",
            ("coarse", 0.3, args.recover_steps, False), ("coarse", 0.2, 0, False), ("uniform", 0.2, 0, False),
            ("coarse", 0.1, 0, False), ("uniform", 0.1, 0, False), ("coarse", 0.2, args.recover_steps, False),
            ("coarse", 0.1, args.recover_steps, False)]
    if args.rows:
        plan = [(a, float(r), int(st), False) for a, r, st in (x.split(":") for x in args.rows.split(","))]
    keep = {}
    for item in plan:
        if item == "latency":
            models = {"dense": dense_model, "cfsp coarse 30%": keep["coarse-0.3"], "cfsp coarse 30% + heads": keep["heads"]}
            lat = latency(models, tok, args.new_tokens, args.reps)
            print("latency", lat, flush=True)
            keep.clear()
            write(out, args, rows, lat, dense, started)
            continue
        allocation, ratio, steps, heads = item
        cfg = CFSPConfig(sparsity=ratio, allocation=allocation, recover_steps=steps, prune_heads=heads,
                         recover_batch_size=1, max_ratio=0.8, round_to=8)
        model = copy.deepcopy(dense_model)
        t = time.perf_counter()
        apply_cfsp(model, cfg, stats, ctx)
        secs = time.perf_counter() - t
        res = perplexity(model, ids, args.seqlen, args.windows, progress=False)
        sizes, kv = layer_sizes(model)
        row = {"allocation": allocation, "sparsity": ratio, "recover_steps": steps, "heads": heads, "ppl": res.ppl,
               "params": param_counts(model), "ffn_sizes": sizes, "kv_heads": kv, "prune_seconds": secs}
        rows.append(row)
        print(f"{allocation} {ratio} rec={steps} heads={heads}: ppl {res.ppl:.3f} params {row['params']['total']}", flush=True)
        if ratio == 0.3 and steps == 0 and allocation == "coarse":
            keep["heads" if heads else "coarse-0.3"] = model
        write(out, args, rows, lat, dense, started)


if __name__ == "__main__":
    main()
