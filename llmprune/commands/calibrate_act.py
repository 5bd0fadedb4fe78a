"""``llmprune calibrate-act``: TEAL activation-sparsity thresholds per layer and linear input group."""

from __future__ import annotations

import argparse

from llmprune.commands.common import add_model_arguments, check_output_dir

NAME = "calibrate-act"
HELP = ("TEAL activation-sparsity thresholds (q/k/v, o, gate/up, down inputs per layer) for a model-level "
        "sparsity, uniform or greedy block-wise allocation; saved as act_thresholds.{json,safetensors}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="checkpoint directory, HF id or alias (default: smollm2-135m)")
    p.add_argument("--act-sparsity", type=float, default=0.4,
                   help="model-level activation sparsity (weighted by the weights each input selects), default 0.4; "
                        "greedy thresholds also serve every lower level")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "greedy"),
                   help="uniform (every group at the level) or greedy (TEAL: per block, the group whose sparsity "
                        "costs the least block output error first) (default uniform)")
    p.add_argument("--step", type=float, default=0.025,
                   help="greedy: block sparsity per step (default 0.025; 0.1 is too coarse to beat uniform, see "
                        "eval/results/act_greedy_step_diag.md)")
    p.add_argument("--greedy-error", default="teal", choices=("relative", "teal"),
                   help="greedy: block error measure, teal (TEAL's: the last quarter of the positions, L2 per "
                        "channel; not dominated by the first token) or relative (squared, every position); on "
                        "SmolLM2 teal gave the lower ppl at 40%% and 50%% (eval/results/act_sparsity_teal.md) "
                        "(default teal)")
    p.add_argument("--greedy-tokens", type=int, default=4096,
                   help="greedy: calibration tokens the block error is measured on (default 4096)")
    p.add_argument("--calib", default="auto", help="calibration source, as for compress (default auto)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward (default 4)")
    p.add_argument("--output", "-o", default=None,
                   help="directory for the thresholds (default: the checkpoint directory; required otherwise). "
                        "A checkpoint directory also gets them recorded in llmprune.json")


def run(args: argparse.Namespace) -> int:
    from llmprune.config import CalibConfig  # heavy imports when the command runs: `--help` answers at once
    from llmprune.runtime.actsparse.calibrate import calibrate_act

    cal = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      batch_size=args.batch_size)
    if args.output is not None:
        check_output_dir(args.output, "--output")
    res = calibrate_act(args.model, args.act_sparsity, args.output, allocation=args.allocation, calibration=cal,
                        greedy_tokens=args.greedy_tokens, step=args.step, greedy_error=args.greedy_error,
                        device=args.device, dtype=args.dtype,
                        progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    th = res.thresholds
    sp = th.group_sparsities()
    means = ", ".join(f"{g} {float(sp[:, i].mean()):.2f}" for i, g in enumerate(("q/k/v", "o", "gate/up", "down")))
    print(f"activation thresholds ({th.allocation}, {th.target:.0%}) written to {res.path}: {th.layers} layers; "
          f"mean group sparsity {means}")
    errs = th.info.get("block_error")
    if errs:
        g, u = errs["greedy"], errs["uniform"]
        print(f"block output error ({th.info.get('greedy_error', 'relative')}, mean over layers): greedy "
              f"{sum(g) / len(g):.3e}, "
              f"uniform {sum(u) / len(u):.3e}")
    if res.recorded_in is not None:
        print(f"recorded in {res.recorded_in} (runtime.act_thresholds); generate/ppl/eval/bench use it")
    else:
        print(f"use it with --act-thresholds {res.path} --act-sparsity {th.target:g}")
    return 0
