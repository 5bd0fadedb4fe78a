"""``llmprune ppl``: WikiText-2 perplexity (paper protocol)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmprune.commands.common import add_model_arguments
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


def run(args: argparse.Namespace) -> int:
    from llmprune.api import resolve_device
    from llmprune.models import load_pretrained, load_tokenizer
    from llmprune.perplexity import perplexity, token_stream, wikitext2_text

    if args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    text = wikitext2_text(args.data_path)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_pretrained(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    ids = token_stream(tokenizer, text)
    res = perplexity(model, ids, args.seqlen, args.max_windows, args.batch_size, progress=not args.quiet)
    print(
        f"wikitext2 ppl {res.ppl:.3f}  (nll {res.nll:.4f}, {res.windows} windows x {res.seqlen} tokens, "
        f"{res.tokens} predicted tokens, {res.seconds:.1f}s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **res.to_dict()}, indent=2) + "\n")
    return 0
