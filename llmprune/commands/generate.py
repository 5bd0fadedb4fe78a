"""``llmprune generate``: text generation, optionally with the pruned bitmap KV cache."""

from __future__ import annotations

import argparse
import sys
import time

from llmprune.commands.common import add_model_arguments
from llmprune.errors import ConfigError

NAME = "generate"
HELP = "generate text (greedy by default), optionally with the pruned bitmap KV cache (--kv-sparsity)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmprune.runtime.flags import add_runtime_arguments  # light (no torch): --help answers at once

    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 1, top-p 0.95) instead of greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--act-correction", type=int, default=None, metavar="K",
                   help="with activation sparsity (greedy): the dense model verifies every K sparse tokens in one "
                        "forward and corrects them and their KV entries (Sirius-style); reports the mean accepted "
                        "length")
    add_runtime_arguments(p)


def _prompts(args: argparse.Namespace, tokenizer) -> list[str]:
    if not args.chat:
        return list(args.prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: this tokenizer has no chat template")
    from jinja2.exceptions import TemplateError  # SecurityError (sandbox), syntax errors, raise_exception()

    try:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in args.prompt]
    except TemplateError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"--chat: the tokenizer's chat template failed ({type(exc).__name__}: {msg[:300]})") from None


def _run_corrected(args: argparse.Namespace, model, tokenizer, prompts: list[str], device) -> int:
    """``--act-correction K``: each prompt decoded on its own (batch 1) with dense verification every K tokens."""
    from llmprune.runtime.actsparse.correction import generate_with_correction

    if args.sample:
        raise ConfigError("--act-correction verifies greedy tokens: it cannot be combined with --sample")
    t0, n_new, accepted = time.perf_counter(), 0, []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        res = generate_with_correction(model, ids, args.max_new_tokens, args.act_correction, tokenizer.eos_token_id)
        if len(prompts) > 1:
            print(f"--- [{i}]")
        text = tokenizer.decode(res.tokens, skip_special_tokens=True)
        print(prompt + text if not args.chat else text)
        n_new += res.tokens.numel()
        accepted += res.accepted
    seconds = time.perf_counter() - t0
    mean = sum(accepted) / max(1, len(accepted))
    print(f"{n_new} new tokens in {seconds:.2f}s ({n_new / max(seconds, 1e-9):.1f} tok/s); act correction every "
          f"{args.act_correction} tokens: {len(accepted)} dense verifications, mean accepted length {mean:.2f} of "
          f"{args.act_correction}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from llmprune.model.access import cache_argument
    from llmprune.model.device import resolve_device
    from llmprune.model.loading import load_tokenizer
    from llmprune.runtime.flags import runtime_dtype
    from llmprune.runtime.load import load_model
    from llmprune.runtime.options import resolve_runtime, runtime_from_args, runtime_setup

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    runtime = resolve_runtime(args.model, runtime_from_args(args))
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_model(args.model, dtype=runtime_dtype(args.dtype, device), device=device,
                       trust_remote_code=args.trust_remote_code, runtime=runtime)
    prompts = _prompts(args, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    empty = [i for i, n in enumerate(enc.attention_mask.sum(-1).tolist()) if n == 0]
    if empty:
        raise ConfigError(f"--prompt {args.prompt[empty[0]]!r}: no tokens to start from (give some text)")
    cache = runtime_setup(model).cache(len(prompts))
    if args.act_correction is not None:
        if cache is not None:
            raise ConfigError("--act-correction needs the dense KV cache (it crops and rewrites the corrected span)")
        return _run_corrected(args, model, tokenizer, prompts, device)
    torch.manual_seed(args.seed)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tokenizer.pad_token_id)
    if args.sample:
        gen_kwargs.update(temperature=1.0, top_p=0.95)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    if cache is not None:  # under the name this transformers takes (no FutureWarning about past_key_values)
        gen_kwargs[cache_argument(model)] = cache
    with torch.no_grad():
        out = model.generate(**enc, **gen_kwargs)
    seconds = time.perf_counter() - t0
    new = out[:, enc.input_ids.shape[1]:]
    for i, text in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(prompts[i] + text if not args.chat else text)
    n_new = int(new.numel())
    summary = f"{n_new} new tokens in {seconds:.2f}s ({n_new / max(seconds, 1e-9):.1f} tok/s)"
    kv = runtime.kv_cache_settings()
    if kv is not None:
        rep = cache.memory_report()
        summary += (
            f"; bitmap KV cache K {cache.k_sparsity:g} / V {cache.v_sparsity:g}, window {kv['window']}: "
            f"{rep['stored_bytes'] / 2**20:.2f} MiB vs {rep['dense_bytes'] / 2**20:.2f} MiB dense ({rep['ratio']:.1%}; "
            f"{cache.compression_ratio(element_size=2):.1%} for a 16-bit cache)"
        )
    else:
        summary += "; dense KV cache"
    print(summary, file=sys.stderr)
    return 0
