"""``llmprune ppl``: WikiText-2 perplexity (paper protocol), with the runtime options active."""

from __future__ import annotations

import argparse
import logging

from llmprune.commands.common import (
    add_model_arguments,
    check_recording_dir,
    recording_dir,
)
from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import ConfigError
from llmprune.evaluate.results import is_checkpoint_dir, record_ppl

NAME = "ppl"
HELP = "WikiText-2 perplexity: non-overlapping windows, mean NLL over all tokens"
log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmprune.runtime.flags import add_runtime_arguments  # light (no torch): --help answers at once

    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--data-path", default=None, help="wiki.test.raw.txt (offline); default: wikitext-2-raw-v1 via datasets")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    add_json_argument(p, "the result")
    p.add_argument("--baseline-of", default=None, metavar="DIR", help="store this (dense) result as the baseline in checkpoint DIR's eval_results.json")
    add_runtime_arguments(p)  # the bitmap KV cache is active through chunked decoding, gates in every forward


def _check_args(args: argparse.Namespace) -> None:
    if args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.baseline_of is not None:
        if not is_checkpoint_dir(args.baseline_of):
            raise ConfigError(f"--baseline-of {args.baseline_of} is not a checkpoint directory")
        check_recording_dir(args.baseline_of, "--baseline-of")


def _record_target(args: argparse.Namespace) -> str | None:
    """Where the result will be stored (decided before any work), or None."""
    if args.baseline_of is not None:
        return args.baseline_of
    if is_checkpoint_dir(args.model) and recording_dir(args.model):
        return args.model
    return None


def run(args: argparse.Namespace) -> int:
    from llmprune.evaluate.perplexity import perplexity, perplexity_with_cache, token_stream, wikitext2_text
    from llmprune.model.device import resolve_device
    from llmprune.model.loading import load_tokenizer
    from llmprune.runtime.actsparse.apply import act_sparsity
    from llmprune.runtime.flags import runtime_dtype
    from llmprune.runtime.load import load_model
    from llmprune.runtime.options import resolve_runtime, runtime_from_args, runtime_setup

    _check_args(args)
    json_out = json_target(args)
    out = text_stream(args)
    runtime = resolve_runtime(args.model, runtime_from_args(args))
    kv = runtime.kv_cache_settings()
    if kv is not None and runtime.attn_enabled:
        raise ConfigError("--kv-sparsity cannot be combined with attention gates")
    target = _record_target(args) if kv is None and not runtime.attn_enabled else None
    try:
        text = wikitext2_text(args.data_path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--data-path {args.data_path} is not a UTF-8 text file (byte {exc.start})") from None
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, dtype=runtime_dtype(args.dtype, device), device=device,
                       trust_remote_code=args.trust_remote_code, runtime=runtime)
    ids = token_stream(tokenizer, text)
    gates_rt = runtime_setup(model).gates
    if gates_rt is not None:  # measure how much true attention mass the kept blocks hold
        gates_rt.measure_recall = gates_rt.active
        gates_rt.reset_stats()
    if kv is None:
        res = perplexity(model, ids, args.seqlen, args.max_windows, args.batch_size, progress=not args.quiet)
    else:  # fed in chunks of the dense window = the token-by-token decode cache state (see llmprune.runtime.kvcache)
        res = perplexity_with_cache(model, ids, args.seqlen, args.max_windows, **kv, progress=not args.quiet)
    print(
        f"wikitext2 ppl {res.ppl:.3f}  (nll {res.nll:.4f}, {res.windows} windows x {res.seqlen} tokens, "
        f"{res.tokens} predicted tokens, {res.seconds:.1f}s)", file=out,
    )
    if gates_rt is not None:
        print(gates_rt.summary(), file=out)
    act_rt = act_sparsity(model)
    if act_rt is not None:  # a perplexity forward is a prefill: sparse only with --act-prefill
        print(act_rt.label() + ("" if act_rt.prefill else ": this perplexity is one prefill forward per window, "
                                "so it is unaffected (add --act-prefill yes)"), file=out)
    if kv is not None:
        print(f"bitmap KV cache K {res.k_sparsity:g} / V {res.v_sparsity:g}, window {res.kv_window}: cache bytes "
              f"{res.bytes_ratio:.1%} of dense ({res.bytes_ratio_16bit:.1%} for a 16-bit cache)", file=out)
    emit_json(json_out, {"model": args.model, **res.to_dict()})
    if kv is not None or gates_rt is not None or act_rt is not None:  # not the checkpoint's plain perplexity: not recorded as such
        log.info("not recorded in eval_results.json: runtime features active (%s)",
                 ", ".join(runtime_setup(model).features))
        return 0
    stored = record_ppl(args.model, res.to_dict(), args.data_path, baseline_of=args.baseline_of) if target else None
    if stored:
        print(f"result recorded in {stored}", file=out)
    return 0
