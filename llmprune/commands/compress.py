"""``llmprune compress``: calibrate, prune and save a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path

from llmprune.api import compress
from llmprune.commands.common import add_model_arguments
from llmprune.config import CalibConfig, Recipe, SaveConfig, build
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.prune.registry import available_methods, get_method, method_for_config
from llmprune.publish.hub import check_push, check_repo_id, push
from llmprune.recipe import load_recipe

NAME = "compress"
HELP = "prune a Hugging Face causal LM and save the checkpoint"
_STAGE_FLAGS = ("prune_heads", "recover_steps", "min_ratio", "max_ratio", "round_to")  # method options (cfsp)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional_help="HF id, local directory or alias (default: smollm2-135m, offline)")
    p.add_argument("--method", default=None, help=f"{', '.join(available_methods())} (default: wanda)")
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
    p.add_argument("--ignore", nargs="+", default=None, metavar="PATTERN", help="module-name patterns left dense")
    p.add_argument("--format", default=None, help="checkpoint format: dense (default) or packed (2:4 values + metadata)")
    p.add_argument("--prune-heads", action="store_true", default=None, help="cfsp: also remove attention head groups")
    p.add_argument("--recover-steps", type=int, default=None, help="cfsp: LoRA recovery steps after pruning (default 0)")
    p.add_argument("--min-ratio", type=float, default=None, help="cfsp: lowest per-layer pruning ratio (default 0)")
    p.add_argument("--max-ratio", type=float, default=None, help="cfsp: highest per-layer pruning ratio (default 0.8)")
    p.add_argument("--round-to", type=int, default=None, help="cfsp: kept FFN sizes are multiples of this (default 8)")
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
    p.add_argument("--record-paths", default="relative", choices=("relative", "absolute"),
                   help="how llmprune.json records local paths (base model, calibration file, command): relative "
                        "to the output directory (default; no user name or directory layout) or absolute")


def _stage_flags(args: argparse.Namespace, method=None) -> dict:
    """Method options given as flags (``--prune-heads`` ...), checked against ``method``'s config."""
    flags = {k: getattr(args, k, None) for k in _STAGE_FLAGS if getattr(args, k, None) is not None}
    names = {f.name for f in dataclasses.fields(method.config_cls)} if method is not None else set(flags)
    for key in flags:
        if key not in names:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to method {method.name!r} (only to cfsp)")
    return flags


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Build the recipe: ``--recipe`` first, then explicit flags on top.

    ``--method``/``--sparsity``/``--ignore`` replace the recipe's single prune
    stage; switching method keeps only the fields every method shares.
    """
    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
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
            raise ConfigError("--prune-heads/--recover-steps/--min-ratio/--max-ratio/--round-to need a single-stage recipe")
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
    ):
        value = getattr(args, flag)
        if value is not None:
            cal[key] = value
    recipe.calibration = CalibConfig(**cal)
    if args.format is not None:
        recipe.save = SaveConfig(format=args.format)
    return recipe


def default_output(model: str | None, recipe: Recipe) -> Path:
    base = Path(str(model or "smollm2-135m").rstrip("/")).name
    parts = [f"{method_for_config(s).name}-{str(s.sparsity).replace(':', 'of')}" for s in recipe.stages]
    return Path(re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join([base, *parts])))


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if args.push_to_hub:
        # Before any work: repo id, token, Hub reachable (rank 0 uploads; one whoami call, not one per rank).
        (check_push if int(os.environ.get("RANK", "0")) == 0 else check_repo_id)(args.push_to_hub)
    output = Path(args.output) if args.output else default_output(args.model, recipe)
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
    print(result.report.table())
    print(f"saved {result.metadata.get('format', recipe.save.format)} checkpoint to {result.output} ({size / 2**20:.1f} MiB)")
    if args.push_to_hub:
        try:
            print(f"pushed to {push(result.output, args.push_to_hub, private=args.private)}")
        except LlmpruneError as exc:  # the checkpoint is saved: say how to retry only the upload
            raise LlmpruneError(f"{exc}; the checkpoint is saved: retry with `llmprune push {result.output} "
                                f"--repo {args.push_to_hub}`") from None
    return 0
