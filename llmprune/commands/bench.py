"""``llmprune bench``: bytes, peak memory, prefill/decode tokens/s, side by side with the dense baseline."""

from __future__ import annotations

import argparse

from llmprune.commands.common import (
    add_model_arguments,
    recording_dir,
)
from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import ConfigError
from llmprune.evaluate.results import is_checkpoint_dir, record_results
from llmprune.formats.checkpoint import read_metadata

NAME = "bench"
HELP = "checkpoint bytes, peak memory, prefill and decode tokens/s vs the dense baseline"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmprune.runtime.flags import add_runtime_arguments  # light (no torch): --help answers at once

    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--baseline", default="auto", metavar="BASE", help="dense baseline: auto (the checkpoint's base_model; none for other models), none, or a model")
    p.add_argument("--batch-size", type=int, default=8, help="the chosen batch, measured besides batch 1 (default 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--baseline-dtype", default=None, metavar="DTYPE",
                   help="dtype of the baseline run (default: the dtype the model runs in, so ratios compare "
                        "pruning, not dtypes)")
    add_json_argument(p, "the results")
    p.add_argument("--no-record", action="store_true", help="do not merge results into DIR/eval_results.json")
    add_runtime_arguments(p)


def _baseline(model: str | None, baseline: str) -> str | None:
    """``--baseline`` -> a model reference or None (``auto``: the checkpoint's base_model, if any)."""
    from llmprune.formats.metadata import resolve_base_model

    if baseline == "auto":
        meta = read_metadata(model) if is_checkpoint_dir(model) else None
        return resolve_base_model(model, meta) if (meta or {}).get("base_model") else None  # relative to the checkpoint
    return None if baseline.lower() == "none" else baseline


def run(args: argparse.Namespace) -> int:
    from llmprune.evaluate.bench import bench, format_bench
    from llmprune.runtime.options import resolve_runtime, runtime_from_args

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    json_out = json_target(args)
    out = text_stream(args)
    record = is_checkpoint_dir(args.model) and not args.no_record and recording_dir(args.model)
    runtime = resolve_runtime(args.model, runtime_from_args(args))
    result = bench(
        args.model, _baseline(args.model, args.baseline), runtime=runtime, batches=[1, args.batch_size],
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, device=args.device, dtype=args.dtype,
        repeats=args.repeats, trust_remote_code=args.trust_remote_code, baseline_dtype=args.baseline_dtype,
    )
    print(format_bench(result), file=out)
    if record:
        path = record_results(args.model, "bench", dict(result))
        print(f"results recorded in {path}", file=out)
    emit_json(json_out, result)
    return 0
