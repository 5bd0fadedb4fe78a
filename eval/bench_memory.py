"""Peak memory of ``llmprune compress`` as models get deeper (streaming engine vs the in-memory path).

For random-weight Llama-shaped models with 1x, 2x and 4x the layers of a base config (SmolLM2-135M's widths,
``--base-layers`` deep), and for the real SmolLM2-135M, each compress runs in a fresh subprocess which reports:

* peak RSS (``VmHWM``: everything resident, including pages of the memory-mapped checkpoint),
* peak anonymous RSS (sampled every ms: what the process itself allocated),
* peak GPU memory (``torch.cuda.max_memory_allocated``) when the layers run on CUDA,
* wall time.

Goal: with the streaming engine (``--low-memory``), < 10% peak growth each time the layer count doubles.
Prints a table and writes ``eval/results/memory.md`` (with the machine description and the command).

    python eval/bench_memory.py                      # CPU, frugal calibration (8 x 256 tokens)
    python eval/bench_memory.py --gpu-8b             # GPU: random Llama-3-8B-shaped model end to end

``--gpu-8b`` writes a randomly initialized 8B-shaped checkpoint (bf16 safetensors shards, written tensor by
tensor, never whole in memory) and prunes it with ``--low-memory`` on CUDA (Wanda and SparseGPT, 2:4,
128 x 2048 calibration tokens), reporting time and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4_validation_2k.parquet"

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
LLAMA3_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write_random_checkpoint(directory: Path, shape: dict, dtype: str, seed: int = 0) -> None:
    """A random-weight Llama checkpoint written tensor by tensor (memory: one tensor at a time)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune.formats.shards import ShardWriter
    from llmprune.model.loading import parse_dtype, resolve_model

    torch_dtype = parse_dtype(dtype)
    config = LlamaConfig(**shape)
    config.dtype = torch_dtype
    with init_empty_weights():
        model = LlamaForCausalLM(config).to(torch_dtype)
    model.tie_weights()
    seen, plan = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            plan.append((name, t.dtype, tuple(t.shape)))
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(tmp, plan, 5 * 10**9)
    g = torch.Generator().manual_seed(seed)
    for name, dt, shp in plan:
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=dt)
        else:
            t = (torch.randn(shp, generator=g) * 0.02).to(dt)
        writer.write(name, t)
        del t
    writer.finish()
    config.save_pretrained(tmp)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)  # ids < 49152 fit any vocab
    os.replace(tmp, directory)


def child(args: argparse.Namespace) -> None:
    """One measured compress (run in a fresh process)."""
    import torch

    import llmprune
    from llmprune.config import CalibConfig, Recipe

    peak = {"anon": _status("RssAnon")}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status("RssAnon"))
            done.wait(0.001)

    cfg = llmprune.SparseGPTConfig(sparsity="2:4") if args.method == "sparsegpt" else llmprune.WandaConfig(sparsity="2:4")
    recipe = Recipe(stages=[cfg], calibration=CalibConfig(source=args.calib, nsamples=args.nsamples,
                                                          seqlen=args.seqlen, batch_size=args.batch_size))
    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    llmprune.compress(args.model, recipe, args.output, device=args.device, progress=False, overwrite=True,
                      low_memory=args.mode == "stream")
    secs = time.perf_counter() - t0
    done.set()
    t.join()
    out = {"peak_rss": _status("VmHWM"), "peak_anon": max(peak["anon"], _status("RssAnon")),
           "base_rss": base_rss, "base_anon": base_anon, "seconds": secs,
           "gpu_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() and args.device != "cpu" else None}
    print("RESULT " + json.dumps(out))


def measure(model: Path, mode: str, out: Path, a: argparse.Namespace, method: str = "wanda") -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--mode", mode, "--output", str(out),
           "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size",
           str(a.batch_size), "--device", a.device, "--method", method]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{model.name} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    desc = f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--method", default="wanda", help=argparse.SUPPRESS)
    p.add_argument("--base-layers", type=int, default=8, help="layers of the 1x random model (SmolLM2 widths)")
    p.add_argument("--dtype", default="float32", help="dtype of the random models")
    p.add_argument("--calib", default=str(C4) if C4.exists() else "self")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="stream,memory", help="stream (--low-memory) and/or memory (in-memory path)")
    p.add_argument("--workdir", default=str(ROOT / "eval" / "results" / "raw" / "memory"))
    p.add_argument("--gpu-8b", action="store_true", help="random Llama-3-8B-shaped model on CUDA, end to end")
    p.add_argument("--results", default=str(ROOT / "eval" / "results" / "memory.md"))
    a = p.parse_args()
    if a.child:
        return child(a)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["eval/bench_memory.py", *sys.argv[1:]])
    rows = []
    if a.gpu_8b:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu-8b needs a CUDA GPU")
        a.device, a.dtype = "cuda", "bfloat16"
        if "--nsamples" not in sys.argv:
            a.nsamples, a.seqlen = 128, 2048
        model = work / "llama3-8b-shape-random"
        if not model.exists():
            t0 = time.perf_counter()
            write_random_checkpoint(model, LLAMA3_8B_SHAPE, a.dtype)
            print(f"wrote {model} in {time.perf_counter() - t0:.0f}s")
        for method in ("wanda", "sparsegpt"):
            r = measure(model, "stream", work / f"out-8b-{method}", a, method)
            rows.append(("Llama-3-8B shape (random)", 32, method, "stream", r))
            print(rows[-1])
    else:
        models = []
        for mult in (1, 2, 4):
            n = a.base_layers * mult
            d = work / f"smollm2-shape-{n}L-{a.dtype}"
            if not d.exists():
                write_random_checkpoint(d, {**SMOLLM2_SHAPE, "num_hidden_layers": n}, a.dtype)
            models.append((f"SmolLM2 widths, {n} layers (random)", n, d))
        from llmprune.model.loading import resolve_model

        models.append(("SmolLM2-135M (real)", 30, Path(resolve_model("smollm2-135m"))))
        for label, n, d in models:
            for mode in a.modes.split(","):
                r = measure(d, mode, work / f"out-{d.name}-{mode}", a)
                rows.append((label, n, "wanda", mode, r))
                print(f"{label:38s} {mode:6s} peak RSS {r['peak_rss'] / 2**20:7.0f} MiB  "
                      f"anon {r['peak_anon'] / 2**20:7.0f} MiB  {r['seconds']:6.1f}s", flush=True)
    table = render(rows, a, command)
    print(table)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(table)


def render(rows, a, command) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    lines = [
        "# Peak memory of compress vs depth",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}",
        "",
        f"Calibration: {Path(a.calib).name} {a.nsamples} x {a.seqlen} tokens, batch {a.batch_size}; "
        f"device {a.device}; random models in {a.dtype}. `stream` = `--low-memory` (meta skeleton, memory-mapped "
        "weights, shards written per layer); `memory` = whole model loaded. Peak RSS = VmHWM of a fresh process "
        "(includes ~0.3-0.5 GiB of imports and mapped checkpoint pages); anon = peak anonymous RSS.",
        "",
        "| model | layers | method | mode | peak RSS (MiB) | peak anon (MiB) | anon above start (MiB) | peak GPU (MiB) "
        "| time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, n, method, mode, r in rows:
        lines.append(f"| {label} | {n} | {method} | {mode} | {mib(r['peak_rss'])} | {mib(r['peak_anon'])} | "
                     f"{mib(r['peak_anon'] - r['base_anon'])} | {mib(r['gpu_peak'])} | {r['seconds']:.1f} |")
    by = {(n, mode): r for label, n, _, mode, r in rows if "random" in label}
    ratios = []
    for mode in ("stream", "memory"):
        ns = sorted(n for n, m in by if m == mode)
        for n1, n2 in zip(ns, ns[1:]):
            r1, r2 = by[n1, mode], by[n2, mode]
            ratios.append(f"| {mode} | {n1} -> {n2} | {r2['peak_rss'] / r1['peak_rss'] - 1:+.1%} | "
                          f"{r2['peak_anon'] / r1['peak_anon'] - 1:+.1%} | "
                          f"{(r2['peak_anon'] - r2['base_anon']) / (r1['peak_anon'] - r1['base_anon']) - 1:+.1%} |")
    if ratios:
        lines += ["", "Growth of the peak when the layer count doubles (goal for `stream`: < +10%):", "",
                  "| mode | layers | peak RSS | peak anon | anon above start |", "|---|---|---|---|---|", *ratios]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
