"""Compress speed: llmprune's default Wanda 2:4 against llm-compressor's ``oneshot`` Wanda 2:4, side by side.

Protocol (issue 19, bug 7):
  * model: SmolLM2-135M-Instruct, the local folder the ``smollm2-135m`` alias resolves to (bf16 on disk),
    loaded offline (``HF_HUB_OFFLINE=1``) by both tools;
  * calibration: 64 samples x 512 tokens from ``../shared/data/c4/c4_validation_2k.parquet``, seed 0. The ids
    are built once here with llmprune's own sampler (:func:`llmprune.calibration.data.load_calibration`, the
    function the CLI calls) and handed to llm-compressor as a pre-tokenized ``datasets.Dataset``; the
    llmprune CLI builds the same ids itself from the parquet (its time includes that step, llm-compressor's
    does not);
  * llmprune: the default CLI, ``llmprune compress smollm2-135m --method wanda --sparsity 2:4 --calib PARQUET
    --nsamples 64 --seqlen 512 --seed 0`` (computes in fp32 on the CPU, saves bf16);
  * llm-compressor: ``oneshot(model, dataset, WandaPruningModifier(sparsity=0.5, mask_structure="2:4",
    targets=[Linear], ignore=["re:.*lm_head"]), num_calibration_samples=64, max_seq_length=512)`` on the model
    loaded in fp32 (its default batch size 1, default sequential pipeline), saved bf16 like llmprune
    (``re:.*lm_head``: llm-compressor names a target ``lm_head.``, so a plain ``"lm_head"`` does not match it and
    the head would be pruned too, which llmprune never does);
  * each run is a fresh subprocess with the same ``OMP_NUM_THREADS``/torch threads, timed wall-clock by this
    script from start to exit (imports, load, calibration, pruning, save); the two tools alternate (A B A B
    ...) so a change of machine load hits both alike; medians and their ratio are reported, with the 1-minute
    load average before/after every run;
  * validity: every decoder linear of both outputs is checked 2:4 and their WikiText-2 perplexity is measured
    on the first ``--ppl-windows`` 512-token windows.

Usage:
    python eval/compress_speed.py --llmc-python /work/llmc-venv/bin/python [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def llmc_worker(model_dir: str, calib: str, out: str, threads: int) -> None:
    """Run inside llm-compressor's venv (no llmprune import): load, oneshot Wanda 2:4, save; print phases."""
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t_import = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = torch.load(calib, weights_only=True)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t_load = time.perf_counter()
    recipe = WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    t_prune = time.perf_counter()
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    t_save = time.perf_counter()
    print("@@" + json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "oneshot_s": t_prune - t_load,
                             "save_s": t_save - t_prune, "threads": torch.get_num_threads()}), flush=True)


def _launch(cmd: list[str], env: dict) -> dict:
    return {"cmd": cmd, "load_before": os.getloadavg()[0], "t0": time.perf_counter(),
            "proc": subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)}


def _finish(job: dict) -> tuple[float, str, str, tuple[float, float]]:
    out, err = job["proc"].communicate()
    wall = time.perf_counter() - job["t0"]
    if job["proc"].returncode != 0:
        raise RuntimeError(f"{job['cmd'][:4]} failed ({job['proc'].returncode}):\n{err[-3000:]}")
    return wall, out, err, (job["load_before"], os.getloadavg()[0])


_PHASES = {  # llmprune's INFO log lines -> phase
    "calibration_data_s": re.compile(r"calibration data: \(\d+, \d+\) in ([\d.]+)s"),
}


def llmprune_cmd(parquet: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "llmprune", "compress", "smollm2-135m", "--method", "wanda", "--sparsity", "2:4",
            "--calib", str(parquet), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
            "--device", "cpu", "--output", str(out), "--overwrite"]


def llmprune_row(tool: str, out: Path, result) -> dict:
    wall, _stdout, stderr, load = result
    meta = json.loads((out / "llmprune.json").read_text())
    row = {"tool": tool, "wall_s": wall, "load_before": load[0], "load_after": load[1],
           "prune_seconds": meta.get("prune_seconds")}
    for name, pat in _PHASES.items():
        m = pat.search(stderr)
        if m:
            row[name] = float(m.group(1))
    return row


def llmc_cmd(model_dir: Path, calib: Path, out: Path, args) -> list[str]:
    return [args.llmc_python, str(HERE), "--llmc-worker", str(model_dir), str(calib), str(out), str(args.threads)]


def llmc_row(result) -> dict:
    wall, stdout, _stderr, load = result
    phases = json.loads([ln for ln in stdout.splitlines() if ln.startswith("@@")][-1][2:])
    return {"tool": "llm-compressor", "wall_s": wall, "load_before": load[0], "load_after": load[1], **phases}


def check_and_score(path: Path, tokenizer, ids, windows: int) -> dict:
    """Every decoder linear of ``path`` is 2:4 (``n_bad`` counts those that are not); WikiText-2 ppl."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmprune.evaluate.perplexity import perplexity
    from llmprune.model.access import decoder_layers, linear_modules
    from llmprune.sparsity import check_nm, sparsity_of

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    mods = [m for layer in decoder_layers(model) for m in linear_modules(layer).values()]
    n_bad = sum(not check_nm(m.weight != 0, 2, 4) for m in mods)
    sparsity = statistics.mean(sparsity_of(m.weight) for m in mods)
    with torch.no_grad():
        ppl = perplexity(model, ids, 512, windows, progress=False).ppl
    masks = {n: (m.weight != 0) for n, m in model.named_modules() if m in mods}
    return {"linears": len(mods), "not_2of4": n_bad, "mean_sparsity": sparsity, "ppl": ppl,
            "masks": masks}


def summarize(rows: list[dict], tool: str, key: str = "wall_s") -> float | None:
    vals = [r[key] for r in rows if r["tool"] == tool and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def write_report(args, rows: list[dict], checks: dict, extra: dict) -> None:
    a, b = summarize(rows, "llmprune"), summarize(rows, "llm-compressor")
    before = summarize(rows, "llmprune-before")
    ratio = a / b if a and b else None
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    flags = (f"--reps {args.reps} --threads {args.threads} --ppl-windows {args.ppl_windows}"
             + (" --concurrent" if args.concurrent else "") + (" --before DIR" if args.before else ""))
    how = ("the tools of each repetition started at the same time (`--concurrent`: on a loaded shared machine "
           "each sees the same load)" if args.concurrent else
           "the runs alternating between the tools (A B, then B A)")
    lines = [
        "# Compress speed: llmprune vs llm-compressor, Wanda 2:4 on SmolLM2-135M",
        "",
        f"Produced by `python eval/compress_speed.py {flags}` on a {os.cpu_count()}-core CPU, torch threads "
        f"{args.threads} (`OMP_NUM_THREADS={args.threads}`) for every tool; llmprune {extra['llmprune_version']}, "
        f"llm-compressor {extra.get('llmc_version', '?')} (its own venv, transformers "
        f"{extra.get('llmc_transformers', '?')}).",
        "",
        "Protocol: see the docstring of `eval/compress_speed.py`: same model folder, same 64 x 512 C4 ids, a fresh "
        f"subprocess per run timed from start to exit, {how}."
        + (" `llmprune-before` is a copy of the package before this change (`--before`), run the same way."
           if args.before else ""),
        "",
        f"1-minute load average around the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores "
        "(other jobs share this machine: the absolute times are upper bounds whenever the load is above the "
        "thread count; the ratio is the comparable number).",
        "",
        "| run | tool | wall (s) | load before | load after | phases (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ph = {k: v for k, v in r.items() if (k.endswith("_s") and k != "wall_s") or k == "prune_seconds"}
        ph_text = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in ph.items() if isinstance(v, (int, float)))
        lines.append(f"| {r['rep'] + 1} | {r['tool']} | {r['wall_s']:.1f} | {r['load_before']:.1f} | "
                     f"{r['load_after']:.1f} | {ph_text} |")
    if ratio:
        lines += ["", f"**Median wall: llmprune {a:.1f} s, llm-compressor {b:.1f} s: ratio {ratio:.2f}x** (goal <= 0.5x)."
                  + (f" llmprune before this change: {before:.1f} s ({before / b:.2f}x)." if before else "")]
    if checks:
        lines += ["", "Validity of the outputs (first run of each tool):", "",
                  "| tool | decoder linears | not 2:4 | mean sparsity | WikiText-2 ppl |", "|---|---|---|---|---|"]
        for tool, c in checks.items():
            if isinstance(c, dict):
                lines.append(f"| {tool} | {c['linears']} | {c['not_2of4']} | {c['mean_sparsity']:.4f} | "
                             f"{c['ppl']:.2f} |")
        lines += ["", f"Perplexity: first {args.ppl_windows} non-overlapping 512-token windows of WikiText-2 raw "
                  "test (joined with \"\\n\\n\"), fp32.",
                  f"Mask agreement between llmprune and llm-compressor: {checks.get('mask_agreement', float('nan')):.4f}"
                  " of the decoder linears' entries."]
        if "llmprune_before_after_identical_masks" in checks:
            lines.append(f"llmprune before/after this change: identical masks: "
                         f"{checks['llmprune_before_after_identical_masks']}.")
    lines += ["", "Commands:", "", f"    {extra.get('llmprune_cmd', '')}",
              "    <llm-compressor venv python> eval/compress_speed.py --llmc-worker MODEL_DIR CALIB.pt OUT THREADS",
              ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    summary = {"median_llmprune_s": a, "median_llmc_s": b, "median_llmprune_before_s": before, "ratio": ratio,
               "rows": rows, "extra": extra,
               "checks": {k: ({kk: vv for kk, vv in v.items() if kk != "masks"} if isinstance(v, dict) else v)
                          for k, v in checks.items()}}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    ap.add_argument("--reps", type=int, default=3, help="runs of each tool (alternating)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 windows for the validity check (0: skip)")
    ap.add_argument("--first", choices=("llmprune", "llm-compressor"), default="llm-compressor")
    ap.add_argument("--before", default=None, help="a copy of an older llmprune package's parent folder: also "
                    "time it (run with PYTHONPATH set to it), for a before/after in the same run")
    ap.add_argument("--concurrent", action="store_true", help="start the tools of a repetition at the same "
                    "time instead of one after the other (a loaded shared machine: both see the same load)")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "compress_speed.md"))
    args = ap.parse_args()

    import torch

    import llmprune
    from llmprune.calibration.data import load_calibration
    from llmprune.config import CalibConfig
    from llmprune.evaluate.perplexity import token_stream, wikitext2_text
    from llmprune.model.loading import ALIASES, load_tokenizer

    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    parquet = shared / "data" / "c4" / "c4_validation_2k.parquet"
    model_dir = ALIASES["smollm2-135m"]()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    tok = load_tokenizer(str(model_dir))
    cfg = CalibConfig(source=str(parquet), nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ids = load_calibration(cfg, tok, progress=False)
    extra = {"llmprune_version": llmprune.__version__, "model_dir": str(model_dir)}
    probe = subprocess.run([args.llmc_python, "-c", "import importlib.metadata as m; print(m.version('llmcompressor'),"
                            " m.version('transformers'))"], capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        extra["llmc_version"], extra["llmc_transformers"] = probe.stdout.split()
    rows: list[dict] = []
    checks: dict = {}
    tools = ["llm-compressor", "llmprune"] + (["llmprune-before"] if args.before else [])
    if args.first == "llmprune":
        tools = tools[1:] + tools[:1]
    before_env = {**env, "PYTHONPATH": str(args.before)} if args.before else env
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.pt"
        torch.save(ids, calib)
        outs = {t: Path(tmp) / f"{t}-out" for t in tools}
        cmds = {"llm-compressor": llmc_cmd(model_dir, calib, outs["llm-compressor"], args),
                "llmprune": llmprune_cmd(parquet, outs["llmprune"], args)}
        if args.before:
            cmds["llmprune-before"] = llmprune_cmd(parquet, outs["llmprune-before"], args)
        extra["llmprune_cmd"] = " ".join(["llmprune", *cmds["llmprune"][3:]]).replace(str(outs["llmprune"]), "OUT")

        def row_of(tool: str, result) -> dict:
            return llmc_row(result) if tool == "llm-compressor" else llmprune_row(tool, outs[tool], result)

        for rep in range(args.reps):
            order = tools if rep % 2 == 0 else tools[::-1]  # A B, then B A: neither tool always goes first
            for t in tools:
                shutil.rmtree(outs[t], ignore_errors=True)
            if args.concurrent:  # all tools at once: the same machine load for each
                jobs = {t: _launch(cmds[t], before_env if t == "llmprune-before" else env) for t in order}
                with ThreadPoolExecutor(len(jobs)) as pool:  # each job's wall ends when *it* exits
                    futures = {t: pool.submit(_finish, job) for t, job in jobs.items()}
                    results = {t: f.result() for t, f in futures.items()}
            else:
                results = {t: _finish(_launch(cmds[t], before_env if t == "llmprune-before" else env)) for t in order}
            for t in order:
                row = {**row_of(t, results[t]), "rep": rep}
                rows.append(row)
                print(f"rep {rep} {t}: {row['wall_s']:.1f}s (load {row['load_before']:.1f} -> "
                      f"{row['load_after']:.1f})", flush=True)
                keep = Path(tmp) / f"first-{t}"
                if args.ppl_windows and not keep.exists():  # the first outputs, for the validity check
                    shutil.copytree(outs[t], keep)
            write_report(args, rows, checks, extra)
        if args.ppl_windows:
            stream = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
            for tool in tools:
                checks[tool] = check_and_score(Path(tmp) / f"first-{tool}", tok, stream, args.ppl_windows)
                print(f"{tool}: {checks[tool]['not_2of4']} linears not 2:4, ppl {checks[tool]['ppl']:.2f}", flush=True)
            ma, mb = checks["llmprune"]["masks"], checks["llm-compressor"]["masks"]
            same = sum(int((ma[n] == mb[n]).sum()) for n in ma if n in mb)
            total = sum(ma[n].numel() for n in ma if n in mb)
            checks["mask_agreement"] = same / max(total, 1)
            if args.before:
                mc = checks["llmprune-before"]["masks"]
                checks["llmprune_before_after_identical_masks"] = all(bool((ma[n] == mc[n]).all()) for n in ma)
    write_report(args, rows, checks, extra)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--llmc-worker":
        llmc_worker(*sys.argv[2:5], int(sys.argv[5]))
    else:
        main()
