"""``llmprune ppl``: WikiText-2 perplexity (paper protocol)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmprune.commands.common import add_model_arguments
from llmprune.commands.generate import add_kv_arguments, kv_settings
from llmprune.errors import ConfigError

NAME = "ppl"
HELP = "WikiText-2 perplexity: non-overlapping windows, mean NLL over all tokens"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--data-path", default=None, help="wiki.test.raw.txt (offline); default: wikitext-2-raw-v1 via datasets")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--attn-sparsity", type=float, default=None, help="learned attention gates: fraction of KV blocks skipped")
    p.add_argument("--gates", default=None, metavar="DIR", help="attach attention gates saved by train-gates in DIR")
    p.add_argument("--baseline-of", default=None, metavar="DIR", help="store this (dense) result as the baseline in checkpoint DIR's eval_results.json")
    add_kv_arguments(p)  # --kv-sparsity/--k-sparsity/--v-sparsity/--kv-window: bitmap KV cache active


def run(args: argparse.Namespace) -> int:
    from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
    from llmprune.model.device import resolve_device
    from llmprune.model.loading import load_pretrained, load_tokenizer

    if args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    kv = kv_settings(args)
    if kv is not None and (args.gates or args.attn_sparsity is not None):
        raise ConfigError("--kv-sparsity cannot be combined with attention gates")
    text = wikitext2_text(args.data_path)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_pretrained(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    ids = token_stream(tokenizer, text)
    from llmprune.runtime.gates.runtime import gates_for_ppl

    gates_rt = gates_for_ppl(model, args.gates, args.attn_sparsity)
    if kv is None:
        res = perplexity(model, ids, args.seqlen, args.max_windows, args.batch_size, progress=not args.quiet)
    else:  # fed in chunks of the dense window = the token-by-token decode cache state (see llmprune.runtime.kvcache)
        from llmprune.evaluate.perplexity import perplexity_with_cache

        res = perplexity_with_cache(model, ids, args.seqlen, args.max_windows, **kv, progress=not args.quiet)
    print(
        f"wikitext2 ppl {res.ppl:.3f}  (nll {res.nll:.4f}, {res.windows} windows x {res.seqlen} tokens, "
        f"{res.tokens} predicted tokens, {res.seconds:.1f}s)"
    )
    if gates_rt is not None:
        print(gates_rt.summary())
    if kv is not None:
        print(f"bitmap KV cache K {res.k_sparsity:g} / V {res.v_sparsity:g}, window {res.kv_window}: cache bytes "
              f"{res.bytes_ratio:.1%} of dense ({res.bytes_ratio_16bit:.1%} for a 16-bit cache)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **res.to_dict()}, indent=2) + "\n")
    if kv is not None or gates_rt is not None:  # not the checkpoint's plain perplexity: not recorded as such
        return 0
    from llmprune.evaluate.lm_eval import record_ppl

    stored = record_ppl(args.model, res.to_dict(), args.data_path, baseline_of=args.baseline_of)
    if stored:
        print(f"result recorded in {stored}")
    return 0
