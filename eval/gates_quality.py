"""Quality of learned attention gates: training time / KL, WikiText-2 ppl at 0 / 50 / 90% block sparsity, recall.

Trains gates on C4 (or reuses ``--gates DIR``), then measures perplexity with the paper protocol (non-overlapping
windows) dense and with gates at each sparsity, recording gate recall (true attention mass inside the kept
blocks) and the achieved fraction of skipped causal block pairs. Writes a markdown table.

    python eval/gates_quality.py                      # everything, one process
    # or in parallel processes (a shared CPU gives each process its own share), then the report:
    python eval/gates_quality.py --stages train &  python eval/gates_quality.py --stages dense
    python eval/gates_quality.py --stages 0.5 &    python eval/gates_quality.py --stages 0.9
    python eval/gates_quality.py --stages report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llmprune.calibration.attn_entropy import attention_entropy
from llmprune.calibration.data import load_calibration
from llmprune.config import CalibConfig
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.model.loading import load_pretrained, load_tokenizer
from llmprune.runtime.gates.budgets import layer_sparsities
from llmprune.runtime.gates.files import save_gates
from llmprune.runtime.gates.gate import GateConfig
from llmprune.runtime.gates.runtime import attach_gates, detach_gates
from llmprune.runtime.gates.training import train_gates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="../shared/data/c4/c4_validation_2k.parquet")
    ap.add_argument("--data", default="../shared/data/wikitext2/wiki.test.raw.txt")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--train-seqlen", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--gate-dim", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=2048, help="ppl window")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--window-start", type=int, default=0, help="skip this many windows (split a stage across processes)")
    ap.add_argument("--stages", default="train,dense,0.5,0.9,report",
                    help="comma list: train, dense, a block sparsity (e.g. 0.5), report")
    ap.add_argument("--raw", default="eval/results/raw/gates_quality", help="gates + per-stage JSON (git-ignored)")
    ap.add_argument("--entropy-nsamples", type=int, default=4, help="C4 sequences for the attention entropy")
    ap.add_argument("--power", type=float, default=-1.0, help="entropy budgets: keep ~ (entropy / max) ** power")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded machine)")
    ap.add_argument("--out", default="eval/results/gates_quality.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw = Path(args.raw)
    raw.mkdir(parents=True, exist_ok=True)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    model = tok = None
    if any(st != "report" for st in stages):
        tok = load_tokenizer(args.model)
        model = load_pretrained(args.model, dtype="float32")  # weights only, no gates
    for st in stages:
        if st == "train":
            cfg = GateConfig.for_model(model, block_size=args.block_size, gate_dim=args.gate_dim)
            ccfg = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.train_seqlen, seed=0)
            calib = load_calibration(ccfg, tok, model)
            gates, rep = train_gates(model, calib, cfg, steps=args.steps, lr=args.lr, device="cpu", batch_size=4)
            info = {"train_seconds": round(rep.seconds, 1), "kl_init": rep.kl_init, "kl_final": rep.kl_final,
                    "calibration": ccfg.to_dict(), "steps": args.steps, "lr": args.lr, "threads": args.threads,
                    "block_size": args.block_size, "gate_dim": args.gate_dim}
            save_gates(gates, raw / "gates", {"base_model": args.model, "attn_sparsity": 0.5, **info})
            (raw / "train.json").write_text(json.dumps(info, indent=2) + "\n")
            print(rep.table(), flush=True)
        elif st == "dense":
            r = perplexity(model, stream(tok, args), args.seqlen, args.windows, progress=False)
            row = {"setting": "dense (no gates)", **r.to_dict(), "skipped": None, "recall": None}
            (raw / f"dense_w{args.window_start}.json").write_text(json.dumps(row, indent=2) + "\n")
            print(row, flush=True)
        elif st.startswith("entropy:"):  # per-layer budgets from the attention entropy, mean s
            s = float(st.split(":", 1)[1])
            sp = layer_sparsities(entropy_scores(model, tok, raw, args), s, power=args.power)
            gated_row(model, tok, raw, args, s, f"gates, entropy budgets (power {args.power:g}), mean attn_sparsity {s}",
                      f"entropy_{s}_p{args.power:g}_w{args.window_start}.json", sp)
        elif st != "report":
            s = float(st)
            gated_row(model, tok, raw, args, s, f"gates, attn_sparsity {s}", f"sparsity_{s}_w{args.window_start}.json")
    if "report" in stages:
        write_report(raw, args)
    return 0


def gated_row(model, tok, raw: Path, args, s: float, setting: str, name: str,
              layer_sparsity: list[float] | None = None) -> None:
    """Perplexity with the gates attached at mean sparsity ``s`` (per-layer ``layer_sparsity`` if given), gate
    recall and achieved sparsity; the row goes to ``raw / name``; the gates are detached afterwards."""
    rt = attach_gates(model, raw / "gates", attn_sparsity=s)
    if layer_sparsity is not None:
        rt.layer_sparsity = layer_sparsity
    rt.measure_recall = True
    rt.reset_stats()
    r = perplexity(model, stream(tok, args), args.seqlen, args.windows, progress=False)
    row = {"setting": setting, **r.to_dict(), "skipped": rt.achieved_sparsity, "recall": rt.recall,
           **({"layer_sparsity": layer_sparsity} if layer_sparsity is not None else {})}
    detach_gates(model)
    (raw / name).write_text(json.dumps(row, indent=2) + "\n")
    print(row, flush=True)


def entropy_scores(model, tok, raw: Path, args) -> list[float]:
    """Per-layer block-attention entropy on --entropy-nsamples x --train-seqlen C4 tokens (seed 0), cached in raw."""
    path = raw / f"attn_entropy_{args.entropy_nsamples}x{args.train_seqlen}.json"
    if path.exists():
        return json.loads(path.read_text())["scores"]
    ccfg = CalibConfig(source=args.calib, nsamples=args.entropy_nsamples, seqlen=args.train_seqlen, seed=0)
    t = time.perf_counter()
    scores = attention_entropy(model, load_calibration(ccfg, tok, model), block_size=args.block_size)
    path.write_text(json.dumps({"scores": scores, "calibration": ccfg.to_dict(), "block_size": args.block_size,
                                "seconds": round(time.perf_counter() - t, 1)}, indent=2) + "\n")
    print("attention entropy per layer", [round(x, 3) for x in scores], flush=True)
    return scores


def stream(tok, args):
    ids = token_stream(tok, wikitext2_text(args.data))
    return ids[:, args.window_start * args.seqlen :]


def merge(parts: list[dict]) -> dict:
    """Window ranges of one setting -> one row (NLL weighted by tokens, recall / skipped by windows)."""
    tokens = sum(p["tokens"] for p in parts)
    nll = sum(p["nll"] * p["tokens"] for p in parts) / tokens
    windows = sum(p["windows"] for p in parts)
    row = {"setting": parts[0]["setting"], "ppl": math.exp(nll), "nll": nll, "tokens": tokens, "windows": windows,
           "seqlen": parts[0]["seqlen"], "seconds": sum(p["seconds"] for p in parts), "parts": len(parts)}
    for key in ("skipped", "recall"):
        row[key] = None if parts[0][key] is None else sum(p[key] * p["windows"] for p in parts) / windows
    return row


def write_report(raw: Path, args) -> None:
    info = json.loads((raw / "train.json").read_text())
    groups = {}
    for p in [*sorted(raw.glob("dense_w*.json")), *sorted(raw.glob("sparsity_*_w*.json")),
              *sorted(raw.glob("entropy_*_w*.json"))]:
        part = json.loads(p.read_text())
        groups.setdefault(part["setting"], []).append(part)
    rows = [merge(parts) for parts in groups.values()]
    kl_i, kl_f = info["kl_init"], info["kl_final"]
    lines = [
        "# Learned attention gates: quality (CPU)",
        "",
        f"Model `{args.model}` (SmolLM2-135M-Instruct, fp32), block size {info['block_size']}, gate dim "
        f"{info['gate_dim']}. Machine: {platform.machine()} CPU shared with other jobs ({os.cpu_count()} cores, "
        f"1-minute load {os.getloadavg()[0]:.1f} at the report), "
        f"{info['threads']} torch thread(s) per process: times are wall clock and only indicative.",
        "",
        f"Gate training: calibration {info['calibration']['nsamples']} x {info['calibration']['seqlen']} tokens of "
        f"`{Path(info['calibration']['source']).name}`, {info['steps']} AdamW steps per layer (minibatch 16 "
        f"sequences of pooled features), lr {info['lr']} cosine: **{info['train_seconds']} s** wall for "
        f"{len(kl_f)} layers. Mean KL(gt || gate) {sum(kl_i) / len(kl_i):.4f} at init -> "
        f"**{sum(kl_f) / len(kl_f):.4f}** after training (per layer min {min(kl_f):.4f}, max {max(kl_f):.4f}).",
        "",
        f"WikiText-2 test, first {rows[0]['windows']} non-overlapping windows of {rows[0]['seqlen']} tokens "
        f"({rows[0]['tokens']} predicted tokens). Block sparsity = fraction of each query block's causal KV blocks "
        "skipped (first and own block always kept, so short prefixes keep more); 'skipped' = achieved fraction over "
        "all causal (query block, KV block) pairs, layers and KV heads. Recall = mean over query rows and heads of "
        "the true attention mass inside the kept blocks.",
        "",
        "| setting | ppl | blocks skipped | gate recall | time (s, summed over processes) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        sp = "-" if r["skipped"] is None else f"{r['skipped']:.1%}"
        rec = "-" if r["recall"] is None else f"{r['recall']:.4f}"
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {sp} | {rec} | {r['seconds']:.0f} |")
    lines += ["", "Commands: `python eval/gates_quality.py --stages train` and `--stages dense`, then `--stages 0.5` "
              "and `--stages 0.9`, each split over two processes (`--windows 5 --window-start 0` / `5`), then "
              "`--stages report` (defaults: "
              f"--nsamples {info['calibration']['nsamples']} --train-seqlen {info['calibration']['seqlen']} "
              f"--steps {info['steps']} --windows {rows[0]['windows']} --seqlen {rows[0]['seqlen']}).", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"total {time.perf_counter() - t0:.0f}s")
    sys.exit(rc)
