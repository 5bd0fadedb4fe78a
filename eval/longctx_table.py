"""Long-context accuracy (RULER-style tasks, generated answers) per task and length: dense vs KV bitmap cache vs
attention gates (vs activation sparsity when thresholds are given) -> eval/results/longctx.md.

Stages write one JSON line per (setting, task, length, sample) to ``--rows`` and skip lines already there, so a
stage can be stopped and resumed, and several stages can run at once (separate processes):

    python eval/longctx_table.py --stage kv      # dense, KV 50 %, KV 70 % (one shared prefill per prompt)
    python eval/longctx_table.py --stage gates --gates DIR   # gates at 50 % and 90 % block sparsity
    python eval/longctx_table.py --stage act --act-thresholds FILE  # activation sparsity 40 %
    python eval/longctx_table.py --stage report

Samples are taken index-major (sample 0 of every task and length, then sample 1, ...), so a stage stopped early
still has about the same count in every cell; the report states the counts and the wall time. ``--samples`` is one
count for every length or per length (``2048:8,4096:4,8192:2``). A (setting, task, length, index) already in any
rows file of the rows folder is skipped, so earlier runs merge (the report reads every rows file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from llmprune.config import RuntimeConfig
from llmprune.evaluate.longctx.haystack import Haystack
from llmprune.evaluate.longctx.prompt import has_chat_template
from llmprune.evaluate.longctx.runner import Variant, run_samples
from llmprune.evaluate.longctx.tasks import TASK_NAMES, make_sample
from llmprune.model.loading import load_tokenizer
from llmprune.runtime.load import load_model
from llmprune.runtime.options import setup_runtime

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "eval" / "results"


def _variants(stage: str, model, args) -> list[tuple[object, list[Variant]]]:
    """``[(model, variants sharing its prefill)]`` for a stage (models configured here)."""
    if stage == "kv":
        out = [Variant("dense")]
        for s in (0.5, 0.7):
            setup = setup_runtime(model, RuntimeConfig(kv_sparsity=s))
            out.append(Variant(f"kv {s:.0%}", setup.options, setup.past_key_values, setup.features))
        setup_runtime(model, RuntimeConfig())
        return [(model, out)]
    if stage == "gates":
        runs = []
        for s in (float(x) for x in args.gate_sparsities.split(",")):  # a model per sparsity: gates act in every forward (prefill too)
            m = load_model(args.model, dtype=args.dtype, device="cpu",
                           runtime=RuntimeConfig(gates=args.gates, attn_sparsity=s))
            runs.append((m, [Variant(f"gates {s:.0%}", {"attn_sparsity": s, "gates": args.gates})]))
        return runs
    if stage == "act":
        cfg = RuntimeConfig(act_sparsity=0.4, act_thresholds=args.act_thresholds)
        m = load_model(args.model, dtype=args.dtype, device="cpu", runtime=cfg)
        return [(m, [Variant("act 40%", cfg.to_dict())])]
    raise SystemExit(f"unknown stage {stage}")


def sample_counts(spec: str, contexts: list[int]) -> dict[int, int]:
    """``"8"`` -> 8 for every length; ``"2048:8,4096:4"`` -> per length (lengths not named get 0)."""
    if ":" not in spec:
        return {c: int(spec) for c in contexts}
    per = {int(c): int(n) for c, n in (x.split(":") for x in spec.split(","))}
    return {c: per.get(c, 0) for c in contexts}


def run_stage(args) -> None:
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    chat = has_chat_template(tok)
    hay = Haystack.load(args.haystack)
    model = load_model(args.model, dtype=args.dtype, device="cpu") if args.stage == "kv" else None
    runs = _variants(args.stage, model, args)
    tag = args.stage if args.stage != "gates" else "gates" + args.gate_sparsities.replace(",", "_")
    rows_path = Path(args.rows or OUT / "longctx" / f"{tag}_{args.contexts.replace(',', '_')}.jsonl")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    for f in rows_path.parent.glob("*.jsonl"):  # earlier runs' rows count as done (and are reported)
        for line in f.read_text().splitlines():
            r = json.loads(line)
            done.add((r["setting"], r["task"], r["context"], r["index"]))
    contexts = [int(c) for c in args.contexts.split(",")]
    counts = sample_counts(args.samples, contexts)
    tasks = args.tasks.split(",")
    for i in range(max(counts.values())):
        for c in (c for c in contexts if i < counts[c]):
            for t in tasks:
                sample = None
                for m, variants in runs:
                    todo = [v for v in variants if (v.label, t, c, i) not in done]
                    if not todo:
                        continue
                    sample = sample or make_sample(t, c, i, tok, hay, args.seed, chat)
                    t0 = time.perf_counter()
                    res = run_samples(m, tok, [sample], todo)
                    wall = time.perf_counter() - t0
                    with rows_path.open("a") as f:
                        for v in todo:
                            r = res[v.label][0]
                            f.write(json.dumps({"setting": v.label, **dataclasses.asdict(r), "wall_s": wall / len(todo),
                                                "outputs": sample.outputs, "load1": os.getloadavg()[0]}) + "\n")
                    print(f"{time.strftime('%H:%M:%S')} #{i} {t}@{c}: " + " ".join(
                        f"{v.label}={res[v.label][0].score:.2f}" for v in todo) + f" ({wall:.0f}s)", flush=True)


ORDER = ["dense", "kv 50%", "kv 70%", "gates 50%", "gates 90%", "act 40%"]


def report(args) -> None:
    files = [Path(args.rows)] if args.rows else sorted((OUT / "longctx").glob("*.jsonl"))
    rows = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    cells: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["context"], r["setting"]), []).append(r)
    settings = [s for s in ORDER if any(k[2] == s for k in cells)]
    contexts = sorted({k[1] for k in cells})
    tasks = [t for t in TASK_NAMES if any(k[0] == t for k in cells)]

    def acc(task, c, s, idx=None):
        rs = [r for r in cells.get((task, c, s), []) if idx is None or r["index"] in idx]
        return (100 * sum(r["score"] for r in rs) / len(rs), len(rs)) if rs else (None, 0)

    lines = ["# Long-context accuracy: RULER-style tasks with the runtime features active in decode (CPU)", "",
             f"Model `{args.model}` (SmolLM2-135M-Instruct, {args.dtype}, max context 8192), chat template, greedy decoding. "
             f"Tasks from `llmprune.evaluate.longctx` (seed {args.seed}; haystack `{Path(args.haystack).name}`); "
             "accuracy = mean RULER string_match_all x 100. Generation budgets: niah_single/multikey 24, "
             "niah_multivalue 48, vartrack 30, cwe 64 tokens. KV bitmap cache: window 32, prefill dense; gates: "
             "block 64, trained with `llmprune train-gates` (8 x 1024 C4 tokens, 200 steps), active in prefill and "
             "decode; activation sparsity: TEAL thresholds from `llmprune calibrate-act --allocation uniform` (16 x 512 C4 "
             "tokens), 40%, decode steps only (prefill dense, the default). Each row compares the same samples "
             "(indices present for every setting).", ""]
    notes = OUT / "longctx" / "protocol_notes.md"  # how this run was actually made (written by hand)
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    tolerable: dict[int, dict[str, str]] = {}

    def settings_at(c):  # the settings with rows at length c (a stage stopped at the deadline may have none)
        return [s for s in settings if any(k[1] == c and k[2] == s for k in cells)]

    def complete(t, c):  # sample indices every setting of that length has for (task, length)
        common = None
        for s in settings_at(c):
            idx = {r["index"] for r in cells.get((t, c, s), [])}
            common = idx if common is None else common & idx
        return common or set()

    partial = [c for c in contexts if not any(complete(t, c) for t in tasks)]
    contexts = [c for c in contexts if c not in partial]  # a length no task has every setting of is not tabled
    for c in contexts:
        here = settings_at(c)
        lines += [f"## context {c}", "", "| task | n | " + " | ".join(here) + " |",
                  "|---|---|" + "---|" * len(here)]
        means = {s: [] for s in here}
        for t in tasks:
            common = complete(t, c)
            if not common:
                continue
            vals = []
            for s in here:
                a, _ = acc(t, c, s, common)
                means[s].append(a)
                vals.append(f"{a:.1f}")
            lines.append(f"| {t} | {len(common)} | " + " | ".join(vals) + " |")
        lines.append("| **mean** | | " + " | ".join(
            f"**{sum(v) / len(v):.1f}**" if v else "-" for v in means.values()) + " |")
        kv = []
        for s in here:
            rs = [r for (t, cc, ss), v in cells.items() if cc == c and ss == s for r in v]
            kv.append(f"{sum(r['kv_bytes'] for r in rs) / len(rs) / 2**20:.2f}" if rs else "-")
        lines += ["| KV cache MiB (mean) | | " + " | ".join(kv) + " |", ""]
        within, ok = [], {}
        if len(here) < len(settings):
            lines += ["Not run at this length (time): " + ", ".join(s for s in settings if s not in here) + ".", ""]
        for s in here[1:]:
            if means[s] and means.get("dense"):
                d = sum(means[s]) / len(means[s]) - sum(means["dense"]) / len(means["dense"])
                within.append(f"{s}: {d:+.1f} points ({'within' if d >= -5 else 'NOT within'} 5 of dense)")
                ok[s] = d >= -5
        lines += ["Mean over tasks vs dense: " + "; ".join(within) + ".", ""]
        for feature in ("kv", "gates", "act"):
            tested = sorted((s for s in ok if s.startswith(feature + " ")), key=lambda s: float(s.split()[1][:-1]))
            if tested:  # the highest tested sparsity at which it and every lower one stay within 5 points
                best = None
                for s in tested:
                    if not ok[s]:
                        break
                    best = s.split()[1]
                levels = ", ".join(s.split()[1] for s in tested)
                verdict = f"up to {best}" if best else f"none ({tested[0].split()[1]} is not)"
                tolerable.setdefault(c, {})[feature] = f"{verdict} (tested {levels})"
    missing_t = [t for t in TASK_NAMES if t not in tasks]
    missing_c = [c for c in sorted({2048, 4096, 8192} | set(partial)) if c not in contexts]
    missing_s = [s for s in ORDER if s not in settings]
    lines += ["n = samples per task, the same sample indices for every setting (index-major order, so a stage stopped "
              "at the deadline leaves about equal counts). With n this small one answer moves a task's score by "
              "100/n points: the comparisons are indicative, not significant.",
              "Not measured in this run (time): " + ("; ".join(x for x in [
                  f"tasks {', '.join(missing_t)}" if missing_t else "", f"contexts {', '.join(map(str, missing_c))}"
                  + (f" (only some settings have rows at {', '.join(map(str, partial))})" if partial else "")
                  if missing_c else "", f"settings {', '.join(missing_s)}" if missing_s else ""] if x)
                                                   or "nothing beyond the settings named per length") + ".", ""]
    if tolerable:
        feats = ["kv", "gates", "act"]
        lines += ["## Sparsity within 5 points of dense (mean over the tasks of each length)", "",
                  "| context | " + " | ".join(f"{f}" for f in feats) + " |", "|---|" + "---|" * len(feats)]
        lines += [f"| {c} | " + " | ".join(tolerable[c].get(f, "-") for f in feats) + " |" for c in contexts
                  if c in tolerable]
        lines += ["", "With n samples per task a single answer moves a task by up to 100/n points and the mean "
                  "over the tasks by 100/(n x tasks): with the n above these verdicts are indicative only.", ""]
    lines += ["## Wall time", "", "Seconds per sample (mean; the KV settings share one prefill per prompt, its "
              "time split evenly over dense / kv 50% / kv 70%) and summed over all samples:", "",
              "| context | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for c in contexts:
        cell = []
        for s in settings:
            ws = [r["wall_s"] for (t, cc, ss), v in cells.items() if cc == c and ss == s for r in v]
            cell.append(f"{sum(ws) / len(ws):.0f} (n={len(ws)})" if ws else "-")
        lines.append(f"| {c} | " + " | ".join(cell) + " |")
    total = {s: sum(r["wall_s"] for r in rows if r["setting"] == s) for s in settings}
    lines.append("| total s | " + " | ".join(f"{total[s]:.0f}" for s in settings) + " |")
    loads = [r["load1"] for r in rows if "load1" in r]
    load = (f"; 1-minute load average when the {len(loads)} rows that record it were written: mean "
            f"{sum(loads) / len(loads):.1f}") if loads else ""
    lines += ["", f"Machine: {platform.machine()} CPU, 2 cores shared with other jobs{load}; {args.threads} torch "
              "thread per process: times are only indicative.", ""]
    check = OUT / "longctx" / "lm_eval_check.md"  # the plain-lm-eval reproduction, written when it was run
    if check.exists():
        lines += [check.read_text().strip(), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True, choices=["kv", "gates", "act", "report"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="model dtype (default float32: bf16 matmuls are slow on CPU)")
    ap.add_argument("--gates", default=None)
    ap.add_argument("--act-thresholds", default=None)
    ap.add_argument("--gate-sparsities", default="0.5,0.9", help="gates stage: block sparsities (a model each; "
                    "one per process runs them in parallel)")
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument("--samples", default="50", help="samples per task and length: N, or per length "
                    "(2048:8,4096:4,8192:2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default=str(ROOT.parent / "shared" / "data" / "c4" / "c4_validation_2k.parquet"))
    ap.add_argument("--rows", default=None, help="rows file (default eval/results/longctx/STAGE_CONTEXTS.jsonl; "
                    "the report reads them all)")
    ap.add_argument("--out", default=str(OUT / "longctx.md"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    report(args) if args.stage == "report" else run_stage(args)


if __name__ == "__main__":
    main()
