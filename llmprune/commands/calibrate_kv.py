"""``llmprune calibrate-kv``: per-layer / per-KV-head bitmap KV-cache budgets from calibration entropies."""

from __future__ import annotations

import argparse

from llmprune.commands.common import add_model_arguments, check_output_dir
from llmprune.errors import ConfigError

NAME = "calibrate-kv"
HELP = ("entropy-guided (UNComp-style) KV-cache budgets per layer and KV head, same mean bytes as uniform; "
        "saved as kv_budgets.json with the checkpoint")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--kv-sparsity", type=float, default=None, help="mean sparsity of K and V, e.g. 0.7")
    p.add_argument("--k-sparsity", type=float, default=None, help="mean key sparsity (overrides --kv-sparsity)")
    p.add_argument("--v-sparsity", type=float, default=None, help="mean value sparsity (overrides --kv-sparsity)")
    p.add_argument("--allocation", default="entropy", choices=("entropy", "sensitivity", "uniform"),
                   help="entropy (low-entropy heads compressed more), sensitivity (measured KL cost of pruning each "
                        "layer's K / V, greedy minimum under the mean; costs 2 x 8 passes per layer) or uniform "
                        "(default entropy)")
    p.add_argument("--per", default=None, choices=("head", "layer"),
                   help="one keep count per KV head, or per layer (default: head for entropy, layer for sensitivity)")
    p.add_argument("--kv-pool", default="joint", choices=("joint", "separate"),
                   help="sensitivity: K and V share one entry budget (joint, default) or keep their own totals")
    p.add_argument("--sens-keeps", default=None, metavar="K,K,...",
                   help="sensitivity: keep counts to measure (default 48,32,24,16,12,8,5,3 at head_dim 64)")
    p.add_argument("--power", type=float, default=1.0, help="keep ~ (entropy / max) ** power (default 1; 0 = uniform)")
    p.add_argument("--min-sparsity", type=float, default=None, help="lowest sparsity of any head (default mean - 0.3; sensitivity: 0)")
    p.add_argument("--max-sparsity", type=float, default=None, help="highest sparsity of any head (default mean + 0.2, <= 0.95; "
                        "sensitivity: that of the smallest measured keep count, 0.95 at head_dim 64)")
    p.add_argument("--calib", default="auto", help="calibration source, as for compress (default auto)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward (default 4)")
    p.add_argument("--output", "-o", default=None,
                   help="directory for kv_budgets.json (default: the checkpoint directory; required otherwise). "
                        "A checkpoint directory also gets it recorded in llmprune.json")


def run(args: argparse.Namespace) -> int:
    from llmprune.config import CalibConfig
    from llmprune.runtime.kvcache.calibrate import calibrate_kv

    if args.kv_sparsity is None and (args.k_sparsity is None or args.v_sparsity is None):
        raise ConfigError("calibrate-kv needs --kv-sparsity (or both --k-sparsity and --v-sparsity)")
    cal = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      batch_size=args.batch_size)
    if args.output is not None:
        check_output_dir(args.output, "--output")
    try:
        keeps = None if args.sens_keeps is None else [int(x) for x in args.sens_keeps.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--sens-keeps must be comma-separated integers, got {args.sens_keeps!r}") from exc
    res = calibrate_kv(args.model, args.kv_sparsity, args.output, k_sparsity=args.k_sparsity,
                       v_sparsity=args.v_sparsity, allocation=args.allocation, calibration=cal, per=args.per,
                       power=args.power, min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity,
                       joint=args.kv_pool == "joint", keeps=keeps, device=args.device, dtype=args.dtype,
                       progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    b = res.budgets
    print(f"KV budgets ({b.allocation}) written to {res.path}: {b.layers} layers x {b.heads} KV heads, "
          f"K keep {min(map(min, b.k_keep))}-{max(map(max, b.k_keep))} / V keep {min(map(min, b.v_keep))}-"
          f"{max(map(max, b.v_keep))} of {b.head_dim} (mean sparsity K {b.mean_sparsity('k'):.4f} / "
          f"V {b.mean_sparsity('v'):.4f}, same bytes as uniform)")
    if res.recorded_in is not None:
        print(f"recorded in {res.recorded_in} (runtime.kv_allocation); generate/ppl/eval/bench use it")
    else:
        print(f"use it with --kv-allocation {res.path}")
    return 0
