"""``llmprune generate``: text generation, optionally with the pruned bitmap KV cache."""

from __future__ import annotations

import argparse
import time

from llmprune.commands.common import add_model_arguments
from llmprune.errors import ConfigError

NAME = "generate"
HELP = "generate text (greedy by default), optionally with the pruned bitmap KV cache (--kv-sparsity)"


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    """``--kv-sparsity``, ``--k-sparsity``, ``--v-sparsity``, ``--kv-window`` (shared with ``llmprune ppl``)."""
    p.add_argument("--kv-sparsity", type=float, default=None,
                   help="prune this fraction of every cached K and V vector per token (bitmap KV cache), e.g. 0.7")
    p.add_argument("--k-sparsity", type=float, default=None, help="key sparsity (overrides --kv-sparsity for K)")
    p.add_argument("--v-sparsity", type=float, default=None, help="value sparsity (overrides --kv-sparsity for V)")
    p.add_argument("--kv-window", type=int, default=None, help="recent tokens kept dense (default 32)")


def kv_settings(args: argparse.Namespace, runtime: dict | None = None) -> dict | None:
    """``{k_sparsity, v_sparsity, window}`` from the flags, else from a checkpoint's recorded runtime; None = dense."""
    runtime = runtime or {}
    base = args.kv_sparsity
    k = args.k_sparsity if args.k_sparsity is not None else base
    v = args.v_sparsity if args.v_sparsity is not None else base
    window = args.kv_window
    if k is None and v is None and window is None:  # nothing on the command line: the checkpoint's own settings
        rt_base = runtime.get("kv_sparsity")
        k = runtime.get("kv_k_sparsity", rt_base)
        v = runtime.get("kv_v_sparsity", rt_base)
        window = runtime.get("kv_window")
    if k is None and v is None:
        if window is not None:
            raise ConfigError("--kv-window needs --kv-sparsity (or --k-sparsity/--v-sparsity)")
        return None
    k = 0.0 if k is None else k
    v = 0.0 if v is None else v
    for name, val in (("k-sparsity", k), ("v-sparsity", v)):
        if not 0.0 <= val < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {val}")
    window = 32 if window is None else window
    if window < 1:
        raise ConfigError(f"--kv-window must be >= 1, got {window}")
    return {"k_sparsity": k, "v_sparsity": v, "window": window}


def checkpoint_runtime(model_ref) -> dict:
    """The ``runtime`` section recorded in a checkpoint's ``llmprune.json`` (empty if none)."""
    from pathlib import Path

    from llmprune.formats.checkpoint import read_metadata

    if model_ref is None or not Path(str(model_ref)).expanduser().is_dir():
        return {}
    meta = read_metadata(Path(str(model_ref)).expanduser()) or {}
    return (meta.get("recipe") or {}).get("runtime") or {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 1, top-p 0.95) instead of greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    add_kv_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from llmprune.model.device import resolve_device
    from llmprune.model.loading import load_pretrained, load_tokenizer
    from llmprune.runtime.kvcache import BitmapKVCache

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    kv = kv_settings(args, checkpoint_runtime(args.model))
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    model = load_pretrained(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    prompts = list(args.prompt)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: this tokenizer has no chat template")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    cache = None
    if kv is not None:
        cache = BitmapKVCache(model.config, kv["k_sparsity"], kv["v_sparsity"], window=kv["window"])
    torch.manual_seed(args.seed)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tokenizer.pad_token_id)
    if args.sample:
        gen_kwargs.update(temperature=1.0, top_p=0.95)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, past_key_values=cache, **gen_kwargs)
    seconds = time.perf_counter() - t0
    new = out[:, enc.input_ids.shape[1]:]
    for i, text in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(prompts[i] + text if not args.chat else text)
    n_new = int(new.numel())
    summary = f"{n_new} new tokens in {seconds:.2f}s ({n_new / max(seconds, 1e-9):.1f} tok/s)"
    if cache is not None:
        rep = cache.memory_report()
        summary += (
            f"; bitmap KV cache K {kv['k_sparsity']:g} / V {kv['v_sparsity']:g}, window {kv['window']}: "
            f"{rep['stored_bytes'] / 2**20:.2f} MiB vs {rep['dense_bytes'] / 2**20:.2f} MiB dense ({rep['ratio']:.1%}; "
            f"{cache.compression_ratio(element_size=2):.1%} for a 16-bit cache)"
        )
    else:
        summary += "; dense KV cache"
    import sys

    print(summary, file=sys.stderr)
    return 0
