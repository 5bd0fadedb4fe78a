"""Issue 19 closing material: cards built offline for a dense, a packed, a CFSP and a converted checkpoint of the
embedded SmolLM2-135M (parsed back with ``huggingface_hub.ModelCard.load``), ``llmprune info --json`` of each.
Writes ``eval/results/usability_cards.md`` (and ``.json``); ``eval/results/usability.md`` adds the
quick-start size and the bf16 perplexity check by hand (commands in it).

Run from the project root: ``OMP_NUM_THREADS=1 python eval/usability.py [--workdir /tmp/usability]``.
Every number in the output is measured by this script (sizes from the files, parameters and sparsity from
the weights).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4_validation_2k.parquet"


def sh(cmd: list[str], cwd: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/llmprune-usability")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "usability_cards.md"))
    args = ap.parse_args()
    from huggingface_hub import ModelCard

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cal = ["--calib", str(C4), "--nsamples", "16", "--seqlen", "128"]
    runs = {
        "dense": ["llmprune", "compress", "smollm2-135m", "--method", "magnitude", "--sparsity", "2:4", "-o", "dense",
                  "--overwrite", "-q"],
        "packed": ["llmprune", "compress", "smollm2-135m", "--method", "wanda", "--sparsity", "2:4", "--format",
                   "packed", "-o", "packed", "--overwrite", "-q", *cal],
        "cfsp": ["llmprune", "compress", "smollm2-135m", "--method", "cfsp", "--sparsity", "0.3", "-o", "cfsp",
                 "--overwrite", "-q", *cal],
        "converted": ["llmprune", "convert", "packed", "--format", "dense", "-o", "converted", "--overwrite"],
    }
    lines = ["# Usability checks (issue 19)", "",
             "Measured by `OMP_NUM_THREADS=1 python eval/usability.py` on the embedded SmolLM2-135M-Instruct "
             "(converted once to its native bf16), offline, on the shared 2-core CPU machine. Every card below was "
             "built with `llmprune card DIR` (no network), parsed back with `huggingface_hub.ModelCard.load`; "
             "`info` is `llmprune info DIR --json` (parameters, bytes and sparsity measured from the weight files).",
             ""]
    record = {}
    for name, cmd in runs.items():
        _, secs = sh(cmd, work)
        d = work / name
        sh(["llmprune", "card", str(d)], work)
        card = ModelCard.load(d / "README.md")
        data = card.data.to_dict()
        info_text, _ = sh(["llmprune", "info", str(d), "--json"], work)
        info = json.loads(info_text)
        modules = info["sparsity"].pop("modules")
        record[name] = {"command": shlex.join(cmd), "seconds": round(secs, 1), "card_metadata": data, "info": info}
        lines += [f"## {name}", "", "```bash", f"cd {work}", shlex.join(cmd), f"llmprune card {name}",
                  f"llmprune info {name} --json", "```", "",
                  f"Run time {secs:.0f} s. `ModelCard.load` metadata:", "", "```json",
                  json.dumps(data, indent=2), "```", "",
                  f"`info --json` ({len(modules)} per-module entries omitted here):", "", "```json",
                  json.dumps({k: v for k, v in info.items() if k != "results"}, indent=2), "```", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
