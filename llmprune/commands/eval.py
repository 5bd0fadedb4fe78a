"""``llmprune eval``: lm-eval harness on the model as llmprune loads it."""

from __future__ import annotations

import argparse

from llmprune.commands.common import (
    add_model_arguments,
    recording_dir,
)
from llmprune.commands.jsonout import STDOUT, add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import ConfigError
from llmprune.evaluate.results import is_checkpoint_dir, record_results
from llmprune.evaluate.task_files import DATA_ENV, OFFLINE_TASKS, resolve_data_dir, write_task_dir
from llmprune.formats.checkpoint import read_metadata

NAME = "eval"
HELP = "lm-eval harness (arc_easy, hellaswag, piqa, ...) on the model as llmprune loads it"


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmprune.commands.eval_longctx import add_longctx_arguments
    from llmprune.runtime.flags import add_runtime_arguments  # light (no torch): --help answers at once

    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--tasks", default=None, help=f"comma-separated lm-eval task names (offline copies: {','.join(OFFLINE_TASKS)})")
    p.add_argument("--limit", type=_limit, default=None, help="examples per task (int) or fraction (<1); default all")
    p.add_argument("--batch-size", default="1", help="lm-eval batch size: an int or 'auto' (default 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0 for the shipped tasks)")
    p.add_argument("--data-dir", default=None, help=f"offline jsonl copies (<task>.jsonl); default ${DATA_ENV}; unset = lm-eval's Hub tasks")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR", help="extra lm-eval task YAML directory (repeatable); overrides shipped tasks")
    p.add_argument("--write-tasks", default=None, metavar="DIR", help="only write the offline task YAMLs for --data-dir into DIR (for `lm_eval --include_path DIR`) and exit")
    add_json_argument(p, "lm-eval's full results", "--output")  # --output FILE: the older spelling
    p.add_argument("--baseline", nargs="?", const="auto", default=None, metavar="BASE", help="also evaluate the dense baseline (default: the checkpoint's base_model) and store it for the model card; give it after MODEL")
    p.add_argument("--baseline-dtype", default=None, metavar="DTYPE",
                   help="dtype of the baseline run (default: the dtype the model runs in)")
    p.add_argument("--no-record", action="store_true", help="do not merge results into DIR/eval_results.json")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval random seed (default 1234)")
    p.add_argument("--act-scoring", default="forward", choices=("forward", "decode"),
                   help="with activation sparsity: forward (lm-eval's one forward per request, a prefill: dense "
                        "unless --act-prefill yes) or decode (context prefilled, continuation scored as sparse "
                        "decode steps, as the runtime produces it) (default forward)")
    p.add_argument("--act-correction", type=int, default=None, metavar="K",
                   help="with --act-scoring decode (implied): the dense model rewrites the KV entries of every K "
                        "continuation tokens (Sirius-style); scores stay the sparse model's")
    add_longctx_arguments(p)
    add_runtime_arguments(p)


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--batch-size must be an int or 'auto', got {text!r}") from None
    if value < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {value}")
    return value


def baseline_ref(model: str | None, baseline: str) -> str:
    """``--baseline`` value -> a model reference (``auto``: the checkpoint's recorded base model)."""
    from llmprune.formats.metadata import resolve_base_model

    if baseline != "auto":
        return baseline
    meta = read_metadata(model) if is_checkpoint_dir(model) else None
    if not meta or not meta.get("base_model"):
        raise ConfigError("--baseline without a value needs an llmprune checkpoint directory (its base_model)")
    return resolve_base_model(model, meta)  # a relative base_model is relative to the checkpoint, not the cwd


def write_tasks(data_dir: str | None, out_dir: str) -> int:
    """``--write-tasks DIR``: only write the offline task YAMLs (for plain ``lm_eval --include_path DIR``)."""
    data = resolve_data_dir(data_dir)
    if data is None:
        raise ConfigError("--write-tasks needs --data-dir (or $LLMPRUNE_LM_EVAL_DATA)")
    out, written = write_task_dir(data, out_dir)
    if not written:
        raise ConfigError(f"no <task>.jsonl for the shipped tasks found in {data}")
    print(f"wrote {len(written)} task YAMLs to {out}: {', '.join(written)}")
    print(f"use: lm_eval --model hf --model_args pretrained=DIR --tasks {written[0]} --include_path {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from llmprune.commands.eval_longctx import longctx_requested, run_longctx
    from llmprune.config import RuntimeConfig
    from llmprune.evaluate.lm_eval import evaluate, format_table, lm_eval_entries
    from llmprune.model.device import resolve_device
    from llmprune.model.loading import load_tokenizer
    from llmprune.runtime.flags import runtime_dtype
    from llmprune.runtime.load import load_model
    from llmprune.runtime.options import resolve_runtime, runtime_from_args, runtime_setup

    if longctx_requested(args):  # niah_single, ...: generated answers (commands/eval_longctx.py)
        return run_longctx(args, baseline_ref(args.model, args.baseline) if args.baseline else None)
    if args.write_tasks:
        return write_tasks(args.data_dir, args.write_tasks)
    if not args.tasks:
        raise ConfigError("--tasks is required (e.g. --tasks arc_easy,hellaswag,piqa)")
    batch_size = _batch_size(args.batch_size)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    output = json_target(args)
    out = text_stream(args)
    runtime = resolve_runtime(args.model, runtime_from_args(args))
    device = resolve_device(args.device)
    base = baseline_ref(args.model, args.baseline) if args.baseline else None
    runs = [(args.model, False)] + ([(base, True)] if base else [])
    record = is_checkpoint_dir(args.model) and not args.no_record and recording_dir(args.model)
    full = {}
    model_dtype = None
    for ref, is_base in runs:
        tokenizer = load_tokenizer(ref, args.trust_remote_code)
        # the baseline runs in the model's dtype unless --baseline-dtype: the comparison is pruning, not dtype
        dtype = (args.baseline_dtype or model_dtype or args.dtype) if is_base else runtime_dtype(args.dtype, device)
        model = load_model(ref, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code,
                           runtime=RuntimeConfig() if is_base else runtime)
        run_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        model_dtype = model_dtype or run_dtype
        setup = runtime_setup(model)
        label = "baseline " + str(ref) if is_base else str(ref or "smollm2-135m")
        print(f"# {label}: {', '.join(setup.features) or 'dense'} on {device}, {run_dtype}", file=out)
        if not is_base and (runtime.kv_sparsity or runtime.kv_k_sparsity or runtime.kv_v_sparsity):
            print("# note: the KV cache sparsity only changes decoding with a cache; lm-eval's loglikelihood tasks "
                  "run one forward pass per request without one, so their scores are unaffected by it", file=out)
        decode_scoring = not is_base and (args.act_scoring == "decode" or args.act_correction is not None)
        if not is_base and (runtime.act_sparsity is not None or runtime.act_thresholds is not None) \
                and not runtime.act_prefill and not decode_scoring:
            print("# note: activation sparsity applies to decode steps; lm-eval's loglikelihood requests are "
                  "multi-token forwards, so they run dense unless --act-prefill yes or --act-scoring decode",
                  file=out)
        results = evaluate(
            model, tokenizer, args.tasks, limit=args.limit, batch_size=batch_size, num_fewshot=args.num_fewshot,
            data_dir=args.data_dir, include_path=args.include_path, seed=args.seed,
            act_scoring="decode" if decode_scoring else "forward",
            act_correction=args.act_correction if decode_scoring else None,
        )
        results.setdefault("llmprune", {}).update(model=str(ref), features=setup.features, runtime=setup.options,
                                                  dtype=run_dtype)
        print(format_table(results), file=out)
        full["baseline" if is_base else "model"] = results
        if record:
            options = dict(setup.options)
            if decode_scoring:  # its own eval_results.json key: not the forward-scored result
                options.update(act_scoring="decode", act_correction=args.act_correction)
            entries = lm_eval_entries(results, model=str(ref), runtime=options if not is_base else None)
            path = record_results(args.model, "lm_eval", entries, baseline=is_base)
        del model
    if record:
        print(f"results recorded in {path}", file=out)
    if output is not None:
        emit_json(output, full["model"] if not base else full)
        if output != STDOUT:
            print(f"lm-eval results written to {args.json}", file=out)
    return 0
