"""``llmprune train-gates``: learn block-sparse attention gates for a frozen model (SeerAttention-style)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from llmprune.commands.common import add_model_arguments, check_output_dir
from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import ConfigError
from llmprune.formats.gates_meta import GATES_FILE

NAME = "train-gates"
HELP = "train learned sparse-attention gates (base model frozen) and save them beside the checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--block-size", type=int, default=64, help="KV block size in tokens (power of two >= 16, default 64)")
    p.add_argument("--gate-dim", type=int, default=64, help="gate projection width per KV head (default 64)")
    p.add_argument("--calib", default="auto", help="calibration source, as for compress (default auto)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048, clipped to the model)")
    p.add_argument("--seed", type=int, default=0, help="sampling / init seed (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward (default 4)")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps per layer (default 300)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--attn-sparsity", type=float, default=0.5,
                   help="block sparsity recorded as the default when the gates are loaded (default 0.5)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "entropy"),
                   help="uniform: every layer skips --attn-sparsity of its blocks; entropy: per-layer budgets with "
                        "that mean from each layer's block-attention entropy on the calibration text (layers with "
                        "concentrated attention keep more), recorded with the gates (default uniform)")
    p.add_argument("--output", "-o", default=None,
                   help="directory for attn_gates.safetensors/.json (default: the model directory if local, "
                        "else ./<model>-gates); a gates-only directory loads with llmprune.load like a checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace existing gates in the output directory")
    add_json_argument(p, "the training report")


def run(args: argparse.Namespace) -> int:
    from llmprune.calibration.data import load_calibration_resolved
    from llmprune.config import CalibConfig, RuntimeConfig
    from llmprune.model.device import resolve_device
    from llmprune.model.loading import DEFAULT_MODEL, load_tokenizer
    from llmprune.runtime.gates.files import save_gates
    from llmprune.runtime.gates.gate import GateConfig
    from llmprune.runtime.gates.training import train_gates
    from llmprune.runtime.load import load_model

    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    RuntimeConfig(attn_sparsity=args.attn_sparsity)  # validated as at run time: the default the gates load with
    if args.gate_dim < 2 or args.gate_dim % 2:
        raise ConfigError(f"--gate-dim must be an even number >= 2, got {args.gate_dim}")
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise ConfigError(f"--block-size must be a power of two >= 16, got {args.block_size}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)  # checked now
    ref = args.model or DEFAULT_MODEL
    local = Path(ref).expanduser()
    if args.output:
        output = Path(args.output).expanduser()
    elif local.is_dir():
        output = local
    else:
        output = Path(f"./{Path(ref).name}-gates")
    if (output / GATES_FILE).exists() and not args.overwrite:
        raise ConfigError(f"{output / GATES_FILE} already exists (pass --overwrite to replace it)")
    check_output_dir(output, "cannot write the gates to")  # before training, not after
    target = json_target(args)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(ref, args.trust_remote_code)
    model = load_model(ref, dtype=args.dtype, trust_remote_code=args.trust_remote_code, gates=False)
    cfg = GateConfig.for_model(model, block_size=args.block_size, gate_dim=args.gate_dim)
    max_ctx = getattr(model.config, "max_position_embeddings", None) or args.seqlen
    calib_cfg = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=min(args.seqlen, max_ctx), seed=args.seed)
    calib, calib_cfg = load_calibration_resolved(calib_cfg, tokenizer, model,  # records auto -> c4 / self
                                                 progress=not args.quiet)
    gates, report = train_gates(
        model, calib, cfg, steps=args.steps, lr=args.lr, device=device, batch_size=args.batch_size,
        progress=not args.quiet, seed=args.seed,
    )
    base = str(local.resolve()) if local.is_dir() else ref
    budgets = {}
    if args.allocation == "entropy" and args.attn_sparsity > 0:
        from llmprune.calibration.attn_entropy import attention_entropy
        from llmprune.runtime.gates.budgets import layer_sparsities

        scores = attention_entropy(model, calib[:4], block_size=args.block_size)  # eager attention, 4 sequences
        budgets = {"allocation": "entropy", "attn_entropy": [round(x, 6) for x in scores],
                   "layer_sparsity": layer_sparsities(scores, args.attn_sparsity)}
    extra = {
        "base_model": base,
        "attn_sparsity": args.attn_sparsity,
        **budgets,
        "calibration": calib_cfg.to_dict(),
        "steps": args.steps,
        "lr": args.lr,
        "kl_init": [round(x, 6) for x in report.kl_init],
        "kl_final": [round(x, 6) for x in report.kl_final],
        "train_seconds": round(report.seconds, 1),
        "command": "llmprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    save_gates(gates, output, extra)
    out = text_stream(args)
    if not args.quiet:
        print(report.table(), file=out)
    print(f"gates for {len(gates)} layers -> {output} (mean KL {report.mean_kl:.4f}, {report.seconds:.1f}s)", file=out)
    emit_json(target, {"output": str(output), "layers": len(gates), "mean_kl": report.mean_kl, **extra})
    return 0
