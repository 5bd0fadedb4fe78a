"""``llmprune bench``: bytes, peak memory, prefill/decode tokens/s, side by side with the dense baseline."""

from __future__ import annotations

import argparse
import json

from llmprune.commands.common import (
    add_model_arguments,
    check_output_file,
    recording_dir,
    write_output_file,
)
from llmprune.errors import ConfigError
from llmprune.evaluate.bench import bench, format_bench
from llmprune.evaluate.results import is_checkpoint_dir, record_results
from llmprune.formats.checkpoint import read_metadata
from llmprune.formats.metadata import resolve_base_model
from llmprune.runtime.options import add_runtime_arguments, resolve_runtime, runtime_from_args

NAME = "bench"
HELP = "checkpoint bytes, peak memory, prefill and decode tokens/s vs the dense baseline"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--baseline", default="auto", metavar="BASE", help="dense baseline: auto (the checkpoint's base_model; none for other models), none, or a model")
    p.add_argument("--batch-size", type=int, default=8, help="the chosen batch, measured besides batch 1 (default 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-record", action="store_true", help="do not merge results into DIR/eval_results.json")
    add_runtime_arguments(p)


def _baseline(model: str | None, baseline: str) -> str | None:
    """``--baseline`` -> a model reference or None (``auto``: the checkpoint's base_model, if any)."""
    if baseline == "auto":
        meta = read_metadata(model) if is_checkpoint_dir(model) else None
        return resolve_base_model(model, meta) if (meta or {}).get("base_model") else None  # relative to the checkpoint
    return None if baseline.lower() == "none" else baseline


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    json_out = check_output_file(args.json, "--json")
    record = is_checkpoint_dir(args.model) and not args.no_record and recording_dir(args.model)
    runtime = resolve_runtime(args.model, runtime_from_args(args))
    result = bench(
        args.model, _baseline(args.model, args.baseline), runtime=runtime, batches=[1, args.batch_size],
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, device=args.device, dtype=args.dtype,
        repeats=args.repeats, trust_remote_code=args.trust_remote_code,
    )
    print(format_bench(result))
    if record:
        path = record_results(args.model, "bench", dict(result))
        print(f"results recorded in {path}")
    if json_out is not None:
        write_output_file(json_out, json.dumps(result, indent=2) + "\n")
    return 0
