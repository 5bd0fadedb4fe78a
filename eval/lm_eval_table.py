"""Quality table: lm-eval accuracies, dense vs pruned checkpoints, on SmolLM2-135M.

Protocol:
  * each row runs the real CLI in a subprocess: `llmprune eval MODEL --tasks ... --limit N --data-dir
    ../shared/data/lm_eval --batch-size B --device cpu --output ROW.json` (zero-shot, lm-eval 0.4.x, offline
    copies of the standard tasks shipped in llmprune/tasks; same prompts and metrics as lm-eval's);
  * rows are cached as JSON under --json-dir, so rows can be produced one at a time and the table rebuilt;
  * --check-cli DIR also runs the plain lm-eval CLI (`lm_eval --model hf --model_args pretrained=DIR
    --include_path <llmprune eval --write-tasks>`) on the first task and compares it with the llmprune row.

Usage:
    python eval/lm_eval_table.py --row dense=smollm2-135m --row "wanda 2:4=/tmp/wanda" ... \\
        --limit 100 --out eval/results/lm_eval.md [--check-cli /tmp/wanda]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["arc_easy", "hellaswag", "piqa", "winogrande", "boolq"]
MAIN = {"arc_easy": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc", "winogrande": "acc", "boolq": "acc"}


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def run_row(model: str, tasks: list[str], limit: int, data_dir: Path, batch: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "llmprune", "eval", model, "--tasks", ",".join(tasks), "--limit", str(limit),
           "--data-dir", str(data_dir), "--batch-size", str(batch), "--device", "cpu", "--output", str(out),
           "--dtype", "float32", "-q"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llmprune eval failed: {res.stderr[-3000:]}")
    data = json.loads(out.read_text())
    data["_wall_s"] = time.perf_counter() - t0
    data["_cmd"] = " ".join(["llmprune", *cmd[3:]])
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def run_plain_lm_eval(model_dir: str, task: str, limit: int, data_dir: Path, batch: int) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        inc = Path(tmp) / "tasks"
        subprocess.run([sys.executable, "-m", "llmprune", "eval", "--write-tasks", str(inc), "--data-dir",
                        str(data_dir)], check=True, capture_output=True)
        out = Path(tmp) / "out"
        cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", task,
               "--include_path", str(inc), "--limit", str(limit), "--batch_size", str(batch), "--device", "cpu",
               "--output_path", str(out)]
        res = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"lm_eval failed: {res.stderr[-3000:]}")
        files = sorted(out.rglob("results_*.json"))
        return json.loads(files[-1].read_text())["results"][task], " ".join(cmd).replace(str(inc), "<tasks>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=MODEL")
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json-dir", default="eval/results/lm_eval")
    ap.add_argument("--out", default="eval/results/lm_eval.md")
    ap.add_argument("--check-cli", default=None, metavar="DIR", help="dense-format checkpoint to run through plain lm_eval")
    ap.add_argument("--rerun", action="store_true", help="ignore cached row JSON")
    ap.add_argument("--only-check", action="store_true", help="only run (and cache) the plain lm_eval CLI check")
    args = ap.parse_args()

    tasks = args.tasks.split(",")
    data_dir = Path(args.shared) / "data" / "lm_eval"
    json_dir = Path(args.json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    plain_path = json_dir / f"plain-lm-eval-{tasks[0]}.json"
    if args.check_cli and (args.rerun or not plain_path.is_file()):
        t0 = time.perf_counter()
        plain, cmd = run_plain_lm_eval(args.check_cli, tasks[0], args.limit, data_dir, args.batch_size)
        plain_path.write_text(json.dumps({"results": plain, "_cmd": cmd, "_wall_s": time.perf_counter() - t0}, indent=2))
    if args.only_check:
        print(plain_path.read_text())
        return
    rows = []
    for spec in args.row:
        label, _, model = spec.partition("=")
        path = json_dir / f"{slug(label)}.json"
        if path.is_file() and not args.rerun:
            data = json.loads(path.read_text())
        else:
            print(f"running {label}: {model}", flush=True)
            data = run_row(model, tasks, args.limit, data_dir, args.batch_size, path)
        rows.append((label, model, data))

    lines = [
        "# lm-eval: dense vs pruned SmolLM2-135M",
        "",
        f"Zero-shot, `--limit {args.limit}` (first {args.limit} examples of each task), batch {args.batch_size}, fp32, "
        f"CPU ({platform.machine()}, a shared 2-core machine: wall times are not speed measurements), "
        "offline task copies from `llmprune/tasks` over `../shared/data/lm_eval` (same prompts and metrics as "
        "lm-eval's standard tasks). Pruned rows: `llmprune compress smollm2-135m --method M --sparsity 2:4 --calib "
        "../shared/data/c4/c4_validation_2k.parquet --nsamples 64 --seqlen 512 --seed 0`. Model: the "
        "SmolLM2-135M-Instruct Q4_1 GGUF from PyPI dequantized to fp32 (see ../shared/README.md).",
        "",
        f"With {args.limit} examples the standard error of an accuracy is about "
        f"±{0.5 / args.limit ** 0.5:.2f}: differences below ~{1.4 * 0.5 / args.limit ** 0.5:.2f} are noise.",
        "",
        "| model | " + " | ".join(f"{t} ({MAIN[t] if t in MAIN else 'acc'})" for t in tasks) + " | mean | wall s |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for label, _, data in rows:
        vals = []
        for t in tasks:
            r = data["results"].get(t, {})
            vals.append(r.get(f"{MAIN.get(t, 'acc')},none"))
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        cells = " | ".join("—" if v is None else f"{v:.3f}" for v in vals)
        lines.append(f"| {label} | {cells} | {mean:.3f} | {data.get('_wall_s', 0):.0f} |")
    if "boolq" in tasks and (data_dir / "boolq.jsonl").is_file():
        with open(data_dir / "boolq.jsonl") as fh:
            golds = [json.loads(line)["gold"] for _, line in zip(range(args.limit), fh)]
        yes = sum(golds)
        lines += ["", f"boolq: {yes} of the first {len(golds)} answers are \"yes\" (always-yes scores "
                  f"{yes / len(golds):.2f}); at 135M parameters boolq accuracy mostly tracks the model's yes/no prior."]
    lines += ["", "All metrics (acc / acc_norm):", ""]
    lines.append("| model | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for label, _, data in rows:
        cells = []
        for t in tasks:
            r = data["results"].get(t, {})
            acc, accn = r.get("acc,none"), r.get("acc_norm,none")
            cells.append(f"{acc:.3f}" + (f" / {accn:.3f}" if accn is not None else "") if acc is not None else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""] + [f"- {label}: `{data.get('_cmd', '')}`" for label, _, data in rows]

    if args.check_cli:
        task = tasks[0]
        cached = json.loads(plain_path.read_text())
        plain, cmd = cached["results"], cached["_cmd"].split(" --output_path")[0]
        ours = next((d for _, m, d in rows if Path(m).resolve() == Path(args.check_cli).resolve()), None)
        if ours is None:
            out = json_dir / "check-cli.json"
            ours = run_row(args.check_cli, [task], args.limit, data_dir, args.batch_size, out)
        o = ours["results"][task]
        same = all(abs(plain[k] - o[k]) < 1e-9 for k in ("acc,none", "acc_norm,none"))
        lines += [
            "",
            "## Plain lm-eval CLI on a dense-format llmprune checkpoint",
            "",
            f"`{cmd.replace(str(args.check_cli), 'DIR')}` (DIR = the Wanda 2:4 checkpoint; `<tasks>` = the directory "
            "written by `llmprune eval --write-tasks <tasks> --data-dir ../shared/data/lm_eval`)",
            "",
            f"| {task} | acc | acc_norm |",
            "|---|---:|---:|",
            f"| plain `lm_eval --model hf` | {plain['acc,none']:.4f} | {plain['acc_norm,none']:.4f} |",
            f"| `llmprune eval` | {o['acc,none']:.4f} | {o['acc_norm,none']:.4f} |",
            "",
            "Identical." if same else "DIFFERENT (see the JSON files).",
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
