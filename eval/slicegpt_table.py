"""Table: SliceGPT slicing of SmolLM2-135M vs CFSP at the same parameter count -- ppl, bytes, CPU decode latency.

Protocol:
  * calibration: --nsamples x --seqlen tokens from the shipped C4 parquet, seed 0 (foundation sampling);
  * SliceGPT rows run ``llmprune.prune.methods.slicegpt.slicegpt_prune`` (what ``llmprune compress --method
    slicegpt`` runs) on a copy of the dense model: sequential PCA (the paper's), kept width a multiple of 8, tied
    embeddings kept tied unless the row says ``untied``;
  * CFSP rows: one calibration pass of the dense model (``collect_stats``), then ``apply_cfsp`` (coarse
    allocation, FFN channels only, round_to 8) at the FFN ratio that removes as many parameters as the SliceGPT
    row next to it (``(dense params - sliced params) / FFN params``);
  * WikiText-2 raw test joined with "\\n\\n", non-overlapping --seqlen windows, first --windows windows;
  * checkpoint bytes: the safetensors files ``save_pretrained`` writes (fp32, like the model run here);
  * latency: greedy decode, batch 1, --new-tokens new tokens, fp32 on CPU, dense / SliceGPT / CFSP runs
    interleaved, median of --reps (the CPU is shared with other jobs: read the ratios, not the seconds).

Rows are written to --out (markdown + json) as soon as they are measured.

Usage:
    OMP_NUM_THREADS=2 python eval/slicegpt_table.py --shared ../shared --out eval/results/slicegpt.md --windows 40
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from cfsp_table import latency, param_counts

import llmprune
from llmprune.api import PruneContext
from llmprune.calibration import load_calibration
from llmprune.calibration.blockstats import collect_stats
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.prune.methods.cfsp import CFSPConfig, apply_cfsp
from llmprune.prune.methods.slicegpt import SliceGPTConfig, slicegpt_prune


def checkpoint_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors once


def write(out: Path, args, rows: list[dict], lat: dict, started: float) -> None:
    dense = rows[0]
    lines = [
        "# SliceGPT vs CFSP at the same parameter count: SmolLM2-135M-Instruct",
        "",
        f"Produced by `python eval/slicegpt_table.py --windows {args.windows} --nsamples {args.nsamples} "
        f"--reps {args.reps} --new-tokens {args.new_tokens} --slicings {args.slicings}"
        f"{f' --reuse {args.reuse}' if args.reuse else ''}` in {(time.perf_counter() - started) / 60:.0f} min on {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, fp32. 1-minute load average at the start / "
        f"now: {args.load_start:.1f} / {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores, shared with other jobs).",
        "",
        f"- Calibration: {args.nsamples} samples x {args.seqlen} tokens from `../shared/data/c4/c4_validation_2k.parquet`, "
        "seed 0 (SliceGPT: the PCA of each block input; CFSP: one statistics pass of the dense model).",
        f"- Perplexity: WikiText-2 raw test joined with \"\\n\\n\", non-overlapping {args.seqlen}-token windows, first "
        f"{args.windows} windows, mean NLL (the foundation protocol uses 100 windows; dense there: 29.88).",
        "- SliceGPT `slicing` = fraction of the hidden size 576 removed (kept width rounded down to a multiple of 8); "
        "sequential PCA; the MLP input has its own basis, so each layer carries two [k, k] shortcuts (attention and "
        "MLP skips), counted in `params`; embeddings stay tied (the final norm ends in a [k, k] map, the embedding "
        "basis also serves the head: `head_weight` 0.8) unless `untied`. No recovery fine-tuning.",
        *(["- Rows marked * are reused from an earlier run of the same protocol (`--reuse`)."] if args.reuse else []),
        "- CFSP: coarse allocation, FFN channels only, round_to 8, no recovery, at the FFN ratio that removes the "
        "same number of parameters as the SliceGPT row above it (none where that row has more parameters than dense).",
        "",
        "| model | slicing / FFN ratio | width k | params (M) | removed of all | checkpoint MB | WikiText-2 ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']}{' *' if r.get('reused') else ''} | {r['ratio']} | {r.get('k', '-')} | {r['params'] / 1e6:.2f} | "
                     f"{1 - r['params'] / dense['params']:.1%} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.2f} |")
    if lat:
        lines += ["", f"CPU greedy decode, batch 1, {args.new_tokens} new tokens (median of {args.reps} interleaved runs, "
                  f"prompt of 6 tokens; measured {lat.get('load', '?')}):",
                  "", "| model | params (M) | seconds | tokens/s | speed-up vs dense |", "|---|---|---|---|---|"]
        for k, v in lat["seconds"].items():
            lines.append(f"| {k} | {lat['params'][k] / 1e6:.2f} | {v:.2f} | {args.new_tokens / v:.1f} | "
                         f"{lat['seconds']['dense'] / v:.2f}x |")
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "latency": lat, "args": vars(args),
                                                    "minutes": (time.perf_counter() - started) / 60}, indent=2) + "\n")


def measure_latency(dense_model, sg, s: float, tok, args) -> dict:
    models = {"dense": dense_model, f"slicegpt {s:.0%}": sg}
    load = os.getloadavg()[0]
    lat = {"seconds": latency(models, tok, args.new_tokens, args.reps),
           "params": {k: total_params(m) for k, m in models.items()},
           "load": f"1-minute load average {load:.1f} -> {os.getloadavg()[0]:.1f}"}
    print("latency", lat, flush=True)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="eval/results/slicegpt.md")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slicings", default="0.25,0.1,0.2,0.3")
    ap.add_argument("--extra", action="store_true", help="also dense-PCA and untied rows at 25%%")
    ap.add_argument("--no-cfsp", action="store_true", help="no CFSP rows")
    ap.add_argument("--reuse", help="json of an earlier run (same protocol): its rows for the same slicings are kept")
    ap.add_argument("--latency-at", type=float, help="slicing of the latency row (default: the first of --slicings)")
    args = ap.parse_args()
    args.load_start = os.getloadavg()[0]
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    out, shared = Path(args.out), Path(args.shared)
    tok = llmprune.load_tokenizer("smollm2-135m")
    dense_model = llmprune.load("smollm2-135m", dtype="float32")
    ids = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
    calib = load_calibration(
        llmprune.CalibConfig(source=str(shared / "data" / "c4" / "c4_validation_2k.parquet"), nsamples=args.nsamples,
                             seqlen=args.seqlen, seed=0), tok, dense_model)
    ctx = PruneContext(calib, torch.device("cpu"), batch_size=8, progress=False)

    def ppl(model) -> float:
        return perplexity(model, ids, args.seqlen, args.windows, progress=False).ppl

    rows = [{"name": "dense", "ratio": "-", "k": 576, "params": total_params(dense_model),
             "bytes": checkpoint_bytes(dense_model), "ppl": ppl(dense_model)}]
    print("dense", rows[0], flush=True)
    write(out, args, rows, {}, started)
    ffn = param_counts(dense_model)["ffn"]
    stats = None
    lat: dict = {}
    variants = [(float(s), "sequential", False) for s in args.slicings.split(",")]
    lat_at = variants[0][0] if args.latency_at is None else args.latency_at
    old = json.loads(Path(args.reuse).read_text())["rows"] if args.reuse else []
    old = {(r["name"], r["ratio"]): r for r in old}
    if lat_at not in [v[0] for v in variants] or ("slicegpt", f"{lat_at:.0%}") in old:
        sg = copy.deepcopy(dense_model)  # the latency model is not sliced below: slice it now
        slicegpt_prune(sg, SliceGPTConfig(sparsity=lat_at), ctx)
        lat = measure_latency(dense_model, sg, lat_at, tok, args)
        write(out, args, rows, lat, started)
        del sg
    if args.extra:
        variants += [(0.25, "dense", False), (0.25, "sequential", True)]
    for s, pca, untie in variants:
        label = f"slicegpt{' dense-PCA' if pca == 'dense' else ''}{' untied' if untie else ''}"
        if (label, f"{s:.0%}") in old:
            rows.append({**old[(label, f"{s:.0%}")], "reused": True})
            partner = [r for key, r in old.items() if key[0] == "cfsp coarse" and r.get("for") == f"{s:.0%}"]
            if not partner:  # older files: the CFSP row right after the SliceGPT row
                names = list(old)
                i = names.index((label, f"{s:.0%}"))
                partner = [old[names[i + 1]]] if i + 1 < len(names) and names[i + 1][0] == "cfsp coarse" else []
            rows += [{**r, "reused": True} for r in partner]
            print("reused", rows[-1], flush=True)
            continue
        t = time.perf_counter()
        sg = copy.deepcopy(dense_model)
        slicegpt_prune(sg, SliceGPTConfig(sparsity=s, pca=pca, untie_embeddings=untie), ctx)
        row = {"name": label, "ratio": f"{s:.0%}", "k": sg.config.llmprune_sliced_dim, "params": total_params(sg),
               "bytes": checkpoint_bytes(sg), "prune_seconds": time.perf_counter() - t, "ppl": ppl(sg)}
        rows.append(row)
        print(row, flush=True)
        write(out, args, rows, lat, started)
        if s == lat_at and pca == "sequential" and not untie and not lat:  # decode latency, right away
            lat = measure_latency(dense_model, sg, s, tok, args)
            write(out, args, rows, lat, started)
        if pca != "sequential" or untie or args.no_cfsp:
            continue
        if stats is None:
            stats = collect_stats(dense_model, calib, ctx.device, 8, heads=False, progress=False)
        ratio = min(0.8, (rows[0]["params"] - row["params"]) / ffn)
        if ratio <= 0:  # the shortcut matrices outweigh what slicing removed: no CFSP partner
            continue
        cf = copy.deepcopy(dense_model)
        apply_cfsp(cf, CFSPConfig(sparsity=ratio, allocation="coarse", max_ratio=0.8, round_to=8), stats, ctx)
        crow = {"name": "cfsp coarse", "ratio": f"{ratio:.1%}", "for": row["ratio"], "params": total_params(cf),
                "bytes": checkpoint_bytes(cf), "ppl": ppl(cf)}
        rows.append(crow)
        print(crow, flush=True)
        write(out, args, rows, lat, started)
        del sg, cf


if __name__ == "__main__":
    main()
