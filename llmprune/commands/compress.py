"""``llmprune compress``: calibrate, prune and save a checkpoint."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llmprune.commands.common import add_model_arguments
from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import ConfigError, LlmpruneError

if TYPE_CHECKING:  # heavy modules (torch, transformers) are imported when a command runs: `--help` answers at once
    from llmprune.config import Recipe

NAME = "compress"
HELP = "prune a Hugging Face causal LM and save the checkpoint"
#: method-config fields whose flag compress defines itself (--recover-steps: also --recover's steps)
_SHARED_METHOD_FLAGS = ("recover_steps",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmprune.commands.method_flags import add_method_arguments, builtin_schema

    methods = builtin_schema()  # the method configs' fields, without importing torch (method_flags docstring)
    add_model_arguments(p, positional_help="HF id, local directory or alias (default: smollm2-135m, offline)")
    p.add_argument("--method", default=None, help=f"{', '.join(methods)} (default: wanda)")
    p.add_argument("--sparsity", default=None, help="N:M such as 2:4 / 4:8, or a ratio such as 0.5 (default 2:4)")
    p.add_argument("--recipe", default=None, help="YAML recipe (flags given explicitly override it)")
    p.add_argument("--calib", default=None, help="auto (default), c4, wikitext2, self, a .txt/.jsonl/.parquet file or a datasets name")
    p.add_argument("--calib-config", default=None, help="datasets config name for --calib")
    p.add_argument("--calib-split", default=None, help="datasets split for --calib (default train)")
    p.add_argument("--calib-field", default=None, help="text column (default text)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 2048, clipped to the model)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward (default 8)")
    p.add_argument("--sequential", default=None, choices=("auto", "module", "layer"),
                   help="which inputs a layer's statistics see: module (earlier linears of the layer already pruned; "
                        "one forward per layer), layer (the dense layer, then a second forward; the Wanda/SparseGPT "
                        "reference order) or auto (default: module when its activations fit in memory and no "
                        "block recovery runs; the resolved order is recorded)")
    p.add_argument("--ignore", nargs="+", default=None, metavar="PATTERN", help="module-name patterns left dense")
    p.add_argument("--format", default=None, help="checkpoint format: dense (default) or packed (2:4 values + metadata)")
    p.add_argument("--act-sparsity", type=float, default=None,
                   help="also calibrate TEAL activation-sparsity thresholds on the pruned model (llmprune "
                        "calibrate-act) for this level and record them (default: the recipe's runtime.act_sparsity)")
    p.add_argument("--act-allocation", default="uniform", choices=("uniform", "greedy"),
                   help="with --act-sparsity: uniform (default) or greedy (TEAL block-wise) allocation")
    p.add_argument("--recover-steps", type=int, default=None,
                   help="with --recover: Adam steps per block part / in total (default 128); cfsp: LoRA recovery steps")
    p.add_argument("--recover", default=None, choices=("block", "e2e", "block+e2e", "none"),
                   help="recovery that keeps the sparsity pattern: block (reconstruct each pruned decoder block against "
                        "the dense one), e2e (distil the whole model from the dense one) or block+e2e (both, in that "
                        "order); none drops a recipe's")
    p.add_argument("--recover-scope", default=None, choices=("separate", "whole"),
                   help="--recover block: attention then MLP (separate, default) or the whole block at once")
    p.add_argument("--recover-mask", default=None, choices=("fixed", "learn"),
                   help="--recover block: keep the mask (fixed, default) or learn the N:M mask (SR-STE)")
    p.add_argument("--recover-loss", default=None, choices=("mse", "token"),
                   help="--recover block: plain MSE (default) or per-token relative error (token: each token's squared "
                        "error over the dense token's squared norm, so attention-sink tokens do not dominate)")
    p.add_argument("--recover-lr", type=float, default=None, help="--recover: peak Adam learning rate (default: block 2e-3, e2e 2e-4)")
    p.add_argument("--recover-distill-steps", type=int, default=None,
                   help="--recover block+e2e: the distillation's Adam steps (default: --recover-steps)")
    p.add_argument("--recover-distill-lr", type=float, default=None,
                   help="--recover block+e2e: the distillation's peak learning rate (default 2e-4)")
    p.add_argument("--recover-distill-nsamples", type=int, default=None, metavar="N",
                   help="--recover e2e|block+e2e: sequences the distillation trains on (default: the calibration set; "
                        "more are drawn from the same source with the next seed)")
    p.add_argument("--recover-batch-size", type=int, default=None, help="--recover: sequences per step (default 1)")
    p.add_argument("--output", "-o", default=None, help="output directory (default ./<model>-<method>-<sparsity>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the checkpoint (with a model card) to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="stream weights layer by layer from the safetensors files and write shards as layers finish "
                        "(default: automatic, when the weights exceed half the free RAM)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <output>.partial")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="budget for calibration activations on the device, e.g. 20GiB (default 30%% of GPU memory)")
    p.add_argument("--offload-dir", default=None, metavar="DIR", help="where activations spilled to disk go")
    p.add_argument("--dist-reduce", default="exact", choices=("exact", "sum"),
                   help="torchrun runs: exact (bit-identical to one process, default) or sum (one all-reduce)")
    p.add_argument("--dry-run", action="store_true",
                   help="show the resolved model, calibration source, recipe, output, engine and a memory/time "
                        "estimate, then stop (nothing is pruned or written)")
    add_json_argument(p, "the run's result (with --dry-run: the plan)")
    p.add_argument("--record-paths", default="relative", choices=("relative", "absolute"),
                   help="how llmprune.json records local paths (base model, calibration file, command): relative "
                        "to the output directory (default; no user name or directory layout) or absolute")
    # last: every method-config field not spelled above gets its flag (--prune-heads, --blocksize, --allocation ...)
    add_method_arguments(p, methods, shared=_SHARED_METHOD_FLAGS)


def format_plan(plan: dict) -> str:
    """The ``--dry-run`` plan as text."""
    lines = [f"model        {plan['model'] or 'smollm2-135m'} -> {plan['resolved_model']}",
             f"output       {plan['output']}", f"engine       {plan['engine']} on {plan['device']}, dtype {plan['dtype']}",
             f"format       {plan['format']}"]
    for st in plan["recipe"]["prune"]:
        lines.append(f"stage        {st['method']} {st['sparsity']}")
    if plan["calibration_source"]:
        cal = plan["recipe"]["calibration"]
        seqlen = (plan.get("estimate") or {}).get("calibration_seqlen") or cal["seqlen"]  # clipped to the model
        lines.append(f"calibration  {plan['calibration_source']}, {cal['nsamples']} x {seqlen} tokens")
    est = plan.get("estimate")
    if est:
        gib = 2**30
        lines.append(f"memory       ~{est['peak_memory_bytes'] / gib:.2f} GiB peak (weights {est['weights_bytes'] / gib:.2f}, "
                     f"activations {est['activation_bytes'] / gib:.2f}, statistics {est['statistics_bytes'] / gib:.2f})")
        if est["time_lower_bound_s"] is not None:
            lines.append(f"time         >= {est['time_lower_bound_s']:.0f} s ({est['forward_flops'] / 1e12:.2f} TFLOP at "
                         f"{est['measured_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s measured matmul; a lower bound)")
    lines.append("dry run: nothing was pruned or written")
    return "\n".join(lines)


def _stage_flags(args: argparse.Namespace, method=None) -> dict:
    """Method options given as flags (``--prune-heads``, ``--blocksize`` ...: generated from the method configs,
    :mod:`llmprune.commands.method_flags`), checked against ``method``'s config (None: all given, unchecked)."""
    from llmprune.commands.method_flags import given, method_options

    if method is None:
        return {flag.field: value for flag, value in given(args)}
    return method_options(args, method)


_RECOVER_FLAGS = {"recover_scope": "scope", "recover_mask": "mask", "recover_lr": "lr",
                  "recover_batch_size": "batch_size", "recover_loss": "loss",
                  "recover_distill_steps": "distill_steps", "recover_distill_lr": "distill_lr",
                  "recover_distill_nsamples": "distill_nsamples"}


def _recovery_from_args(args: argparse.Namespace, current):
    """The recipe's ``recover`` section with ``--recover*`` flags on top (None: no recovery).

    With recovery on, ``--recover-steps`` sets its steps (and is taken out of the cfsp method flags).
    """
    from llmprune.config import RecoveryConfig, build

    mode = getattr(args, "recover", None)
    given = {key: getattr(args, flag) for flag, key in _RECOVER_FLAGS.items() if getattr(args, flag, None) is not None}
    if mode == "none" or (mode is None and current is None):
        if given:
            raise ConfigError(f"--{next(iter(k for k in _RECOVER_FLAGS if getattr(args, k, None) is not None)).replace('_', '-')} "
                              "needs --recover block|e2e|block+e2e (or a recipe's recover: section)")
        return None
    fields = {**(current.to_dict() if current is not None else {}), **given}
    if mode is not None:
        fields["mode"] = mode
    if getattr(args, "recover_steps", None) is not None:
        fields["steps"], args.recover_steps = args.recover_steps, None
    return build(RecoveryConfig, fields, "recover")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Build the recipe: ``--recipe`` first, then explicit flags on top.

    ``--method``/``--sparsity``/``--ignore`` replace the recipe's single prune
    stage; switching method keeps only the fields every method shares.
    """
    from llmprune.config import CalibConfig, Recipe, SaveConfig, build
    from llmprune.prune.registry import get_method, method_for_config
    from llmprune.recipe import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    recipe.recover = _recovery_from_args(args, recipe.recover)  # first: it may take --recover-steps
    if args.method is not None or args.sparsity is not None or args.ignore is not None or not recipe.stages:
        if len(recipe.stages) > 1:
            raise ConfigError("--method/--sparsity/--ignore cannot override a multi-stage recipe; edit the recipe")
        base_method = method_for_config(recipe.stages[0]).name if recipe.stages else "wanda"
        fields = recipe.stages[0].to_dict() if recipe.stages else {"sparsity": "2:4"}
        method = get_method(args.method or base_method)
        if method.name != base_method:
            fields = {k: fields[k] for k in ("sparsity", "ignore") if k in fields}
        if args.sparsity is not None:
            fields["sparsity"] = args.sparsity
        if args.ignore is not None:
            fields["ignore"] = args.ignore
        fields.update(_stage_flags(args, method))
        recipe.stages = [build(method.config_cls, fields, f"method {method.name}")]
    if _stage_flags(args):
        if len(recipe.stages) != 1:
            raise ConfigError("method flags (--prune-heads, --blocksize ...) need a single-stage recipe")
        method = method_for_config(recipe.stages[0])
        fields = {**recipe.stages[0].to_dict(), **_stage_flags(args, method)}
        recipe.stages = [build(method.config_cls, fields, f"method {method.name}")]
    cal = recipe.calibration.to_dict()
    for flag, key in (
        ("calib", "source"),
        ("calib_config", "dataset_config"),
        ("calib_split", "split"),
        ("calib_field", "text_field"),
        ("nsamples", "nsamples"),
        ("seqlen", "seqlen"),
        ("seed", "seed"),
        ("batch_size", "batch_size"),
        ("sequential", "sequential"),
    ):
        value = getattr(args, flag)
        if value is not None:
            cal[key] = value
    recipe.calibration = CalibConfig(**cal)
    recipe.validate()
    if args.format is not None:
        recipe.save = SaveConfig(**{**recipe.save.to_dict(), "format": args.format})  # keeps save.dtype
    return recipe


def default_output(model: str | None, recipe: Recipe) -> Path:
    from llmprune.prune.registry import method_for_config

    base = Path(str(model or "smollm2-135m").rstrip("/")).name
    parts = [f"{method_for_config(s).name}-{str(s.sparsity).replace(':', 'of')}" for s in recipe.stages]
    return Path(re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join([base, *parts])))


def run(args: argparse.Namespace) -> int:
    from llmprune.api import compress
    from llmprune.publish.hub import check_push, check_repo_id, push

    recipe = recipe_from_args(args)
    act = args.act_sparsity if args.act_sparsity is not None else recipe.runtime.act_sparsity
    if act is not None and recipe.runtime.act_thresholds is None and not 0 < act < 1:  # before any work
        raise ConfigError(f"--act-sparsity must be in (0, 1), got {act!r}")
    if args.push_to_hub:
        # Before any work: repo id, token, Hub reachable (rank 0 uploads; one whoami call, not one per rank).
        (check_push if int(os.environ.get("RANK", "0")) == 0 else check_repo_id)(args.push_to_hub)
    output = Path(args.output) if args.output else default_output(args.model, recipe)
    target = json_target(args)
    if args.dry_run:
        from llmprune.engine.dryrun import plan_compress

        plan = plan_compress(args.model, recipe, output, device=args.device, dtype=args.dtype,
                             overwrite=args.overwrite, low_memory=args.low_memory, resume=args.resume,
                             trust_remote_code=args.trust_remote_code)
        print(format_plan(plan), file=text_stream(args))
        emit_json(target, plan)
        return 0
    result = compress(
        args.model,
        recipe,
        output,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        low_memory=args.low_memory,
        resume=args.resume,
        max_memory=args.max_memory,
        offload_dir=args.offload_dir,
        dist_reduce=args.dist_reduce,
        record_paths=args.record_paths,
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
        command=shlex.join(["llmprune", *sys.argv[1:]]),
    )
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports (and wrote the checkpoint)
        return 0
    size = sum(f.stat().st_size for f in result.output.rglob("*") if f.is_file())
    out = text_stream(args)
    print(result.report.table(), file=out)
    print(f"saved {result.metadata.get('format', recipe.save.format)} checkpoint to {result.output} ({size / 2**20:.1f} MiB)",
          file=out)
    if act is not None and recipe.runtime.act_thresholds is None:  # thresholds of the pruned model, recorded
        from llmprune.runtime.actsparse.calibrate import calibrate_act

        res = calibrate_act(str(result.output), act, allocation=args.act_allocation, calibration=recipe.calibration,
                            device=args.device, progress=not args.quiet, trust_remote_code=args.trust_remote_code)
        print(f"activation thresholds ({res.thresholds.allocation}, {act:.0%}) written to {res.path}", file=out)
    emit_json(target, {"output": str(result.output), "bytes": size, "metadata": result.metadata})
    if args.push_to_hub:
        try:
            print(f"pushed to {push(result.output, args.push_to_hub, private=args.private)}")
        except LlmpruneError as exc:  # the checkpoint is saved: say how to retry only the upload
            raise LlmpruneError(f"{exc}; the checkpoint is saved: retry with `llmprune push {result.output} "
                                f"--repo {args.push_to_hub}`") from None
    return 0
