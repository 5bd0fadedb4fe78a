"""``llmprune eval --tasks niah_single,...``: the long-context tasks, generated with the runtime features in decode.

Part of the ``eval`` subcommand (:mod:`llmprune.commands.eval` routes here when ``--tasks`` names long-context
tasks; naming them together with lm-eval tasks is an error: run the two kinds in separate calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from llmprune.errors import ConfigError
from llmprune.evaluate.longctx.tasks import TASK_NAMES

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 20


def add_longctx_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"long-context tasks ({', '.join(TASK_NAMES)}): answers generated with the runtime "
                             "options active in decode, dense side by side")
    g.add_argument("--context", default=None, metavar="N[,N...]", help="context lengths in tokens, e.g. 2048,4096")
    g.add_argument("--samples", type=int, default=None, help=f"examples per task and length (default {DEFAULT_SAMPLES})")
    g.add_argument("--haystack", default=None, metavar="PATH",
                   help="haystack corpus: a .parquet (column text) or a text file; default RULER's repeated noise")
    g.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a chat template")
    g.add_argument("--no-dense", action="store_true", help="do not also run the model with the runtime options off")


def longctx_requested(args: argparse.Namespace) -> bool:
    """True when ``--tasks`` names long-context tasks (only those: mixing with lm-eval tasks is an error)."""
    names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    ours = [t for t in names if t in TASK_NAMES]
    other = [t for t in names if t not in TASK_NAMES]
    if args.context is not None or args.samples is not None or args.haystack is not None:
        if other:  # the long-context flags name the kind: a typo is an unknown long-context task, not lm-eval's
            raise ConfigError(f"unknown long-context task(s): {', '.join(other)} (known: {', '.join(TASK_NAMES)}; "
                              "--context/--samples/--haystack are for those)")
        if not ours:
            raise ConfigError(f"--tasks: name long-context tasks ({', '.join(TASK_NAMES)})")
    if not ours:
        return False
    if other:
        raise ConfigError(f"--tasks mixes long-context tasks ({', '.join(ours)}) with lm-eval tasks "
                          f"({', '.join(other)}); run them in separate calls")
    return True


def _contexts(text: str | None) -> list[int]:
    if not text:
        raise ConfigError("--context is required for the long-context tasks (e.g. --context 2048,4096)")
    out = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise ConfigError(f"--context: not an integer: {part.strip()!r}") from None
        if value < 1:
            raise ConfigError(f"--context must be >= 1, got {value}")
        out.append(value)
    return out


def _settings(args: argparse.Namespace, haystack, chat: bool, samples: int) -> dict:
    return {"seed": args.seed, "haystack": haystack.source, "chat_template": chat, "samples": samples}


def run_longctx(args: argparse.Namespace, base: str | None = None) -> int:
    """Run (or, with ``--write-tasks``, only write) the long-context tasks; ``base``: the ``--baseline`` model."""
    from llmprune.commands.common import recording_dir
    from llmprune.commands.jsonout import STDOUT, emit_json, json_target, text_stream
    from llmprune.config import RuntimeConfig
    from llmprune.evaluate.longctx.haystack import Haystack
    from llmprune.evaluate.longctx.prompt import has_chat_template
    from llmprune.evaluate.longctx.report import SECTION, entries, format_table, summarize
    from llmprune.evaluate.longctx.runner import run_samples
    from llmprune.evaluate.longctx.task_files import write_task_dir
    from llmprune.evaluate.longctx.tasks import check_contexts, make_samples
    from llmprune.evaluate.results import is_checkpoint_dir, record_results
    from llmprune.model.device import resolve_device
    from llmprune.model.loading import load_tokenizer
    from llmprune.runtime.load import load_model
    from llmprune.runtime.options import resolve_runtime, runtime_from_args

    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    contexts = _contexts(args.context)
    n = args.samples if args.samples is not None else DEFAULT_SAMPLES
    if n < 1:
        raise ConfigError(f"--samples must be >= 1, got {n}")
    for flag, value in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot)):
        if value is not None:
            raise ConfigError(f"{flag} is for lm-eval tasks; the long-context tasks take --samples")
    haystack = Haystack.load(args.haystack)
    if args.write_tasks:
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        chat = has_chat_template(tokenizer) and not args.no_chat_template
        samples = make_samples(tasks, contexts, n, tokenizer, haystack, args.seed, chat)
        out, names = write_task_dir(samples, args.write_tasks)
        print(f"wrote {len(names)} long-context tasks ({n} samples each) to {out}: {', '.join(names)}")
        print(f"use: lm_eval --model hf --model_args pretrained=DIR,max_length={max(contexts)} --tasks "
              f"{names[0]} --include_path {out}{' --apply_chat_template' if chat else ''}")
        return 0
    output = json_target(args)
    out = text_stream(args)
    runtime = resolve_runtime(args.model, runtime_from_args(args))
    device = resolve_device(args.device)
    record = is_checkpoint_dir(args.model) and not args.no_record and recording_dir(args.model)
    summaries: dict[str, list[dict]] = {}
    payload: dict[str, dict] = {}
    for ref, is_base in [(args.model, False)] + ([(base, True)] if base else []):
        tokenizer = load_tokenizer(ref, args.trust_remote_code)
        chat = has_chat_template(tokenizer) and not args.no_chat_template
        model = load_model(ref, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code,
                           runtime=RuntimeConfig() if is_base else runtime, gates=not is_base)
        check_contexts(model.config, contexts)
        samples = make_samples(tasks, contexts, n, tokenizer, haystack, args.seed, chat)
        runs = _runs(model, args, ref, device, is_base)
        for model_run, variants in runs:
            label = "baseline " + str(ref) if is_base else str(ref or "smollm2-135m")
            for v in variants:
                print(f"# {label} [{v.label}]: {', '.join(v.features) or 'dense'} on {device}, "
                      f"{len(samples)} samples ({n} per task and length)", file=out)
            results = run_samples(model_run, tokenizer, samples, variants, progress=log.info)
            for v in variants:
                name = ("base: " if is_base else "") + v.label
                summaries[name] = summarize(results[v.label])
                payload[name] = {"model": str(ref), "runtime": v.runtime, "features": v.features,
                                 "summary": summaries[name],
                                 "samples": [dataclasses.asdict(r) for r in results[v.label]]}
                if record:
                    path = record_results(args.model, SECTION, entries(
                        summaries[name], model=str(ref), runtime=v.runtime, settings=_settings(args, haystack, chat, n)),
                        baseline=is_base)
        del model
    print(format_table(summaries), file=out)
    if record:
        print(f"results recorded in {path}", file=out)
    emit_json(output, {"settings": _settings(args, haystack, chat, n), "runs": payload})
    if output is not None and output != STDOUT:
        print(f"long-context results written to {output}", file=out)
    return 0


def _runs(model, args, ref, device, is_base) -> list[tuple[object, list]]:
    """``[(model, variants)]``: the options as loaded, plus the dense reference: the same model when only the KV
    cache differs (the variants then share each prompt's prefill), else a second load with no runtime options
    (gates and activation sparsity change the model itself)."""
    from llmprune.config import RuntimeConfig
    from llmprune.evaluate.longctx.report import runtime_label
    from llmprune.evaluate.longctx.runner import Variant
    from llmprune.runtime.load import load_model
    from llmprune.runtime.options import runtime_setup

    setup = runtime_setup(model)
    opts = setup.options
    label = runtime_label(opts) if opts else ("gates" if setup.gates is not None else "dense")
    main = Variant(label, opts, setup.past_key_values, setup.features)
    if is_base or label == "dense" or args.no_dense:
        return [(model, [main])]
    if setup.gates is None and set(opts) <= set(RuntimeConfig.KV_FIELDS):
        return [(model, [Variant("dense"), main])]
    dense = load_model(ref, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code,
                       runtime=RuntimeConfig(), gates=False)
    return [(dense, [Variant("dense")]), (model, [main])]
