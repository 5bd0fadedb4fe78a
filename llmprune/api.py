"""Public entry points: :func:`prune` (in memory) and :func:`compress` (load -> prune -> save).

The CLI and the eval scripts are thin wrappers over these.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.calibration.data import (
    check_calib_source,
    clip_seqlen,
    extend_calibration,
    load_calibration_resolved,
)
from llmprune.config import PruneConfig, Recipe, RecoveryConfig
from llmprune.config.recipe import check_sequential
from llmprune.engine.layerwise import capture_inputs, default_compute_dtype, prune_layerwise
from llmprune.engine.preflight import check_model_finite, preflight, recipe_needs_calibration
from llmprune.engine.run import model_is_path
from llmprune.engine.sequential import resolve_sequential
from llmprune.engine.step import check_stages, verify_model
from llmprune.engine.streaming import (
    StreamOptions,
    check_offload_dir,
    check_stream_options,
    compress_streaming,
    use_streaming,
)
from llmprune.engine.workdir import finished_output
from llmprune.errors import ConfigError
from llmprune.formats.checkpoint import check_output, get_format, save_checkpoint
from llmprune.formats.metadata import build_metadata, check_record_paths
from llmprune.model.access import (
    DEFAULT_IGNORE,
    matches_any,
)
from llmprune.model.device import resolve_device
from llmprune.model.loading import DEFAULT_MODEL, load_pretrained, load_tokenizer, parse_dtype, resolve_model
from llmprune.model.structured import is_nonuniform
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import CompressResult, PruneReport
from llmprune.recover.distill import distill
from llmprune.recover.layer import check_recovery

__all__ = ["CompressResult", "PruneContext", "compress", "prune"]

log = logging.getLogger(__name__)


@dataclass
class PruneContext:
    """What a ``"model"``-kind method receives besides the model and its config."""

    calib: torch.Tensor | None
    device: torch.device
    batch_size: int = 8
    progress: bool = True
    ignore: tuple[str, ...] = DEFAULT_IGNORE


def prune(
    model: nn.Module,
    config: PruneConfig | Sequence[PruneConfig],
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    recover: RecoveryConfig | None = None,
    sequential: str = "auto",
    distill_calib: torch.Tensor | None = None,
) -> PruneReport:
    """Prune ``model`` in place with one config or a sequence of stages.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral, Qwen2, OPT, ...).
        config: e.g. ``WandaConfig(sparsity="2:4")``; stages run in order, each
            re-calibrating on the model left by the previous one.
        calib: ``[nsamples, seqlen]`` token ids (not needed for magnitude).
        device: where each decoder layer runs (default: CUDA if available).
        batch_size: calibration sequences per forward pass.
        progress: progress bars over layers.
        recover: recovery that keeps the pattern (:mod:`llmprune.recover`): ``mode="block"`` reconstructs
            each pruned decoder block against the dense one inside the layer loop, ``mode="e2e"`` distills
            the pruned model from a copy of the dense one afterwards, ``mode="block+e2e"`` does both; None: none.
        sequential: which inputs each decoder layer's statistics see (:attr:`CalibConfig.sequential`):
            ``"module"`` (one pass per layer), ``"layer"`` (the dense layer, two passes) or ``"auto"``
            (:func:`~llmprune.engine.sequential.resolve_sequential`); the order used is ``report.sequential``.
        distill_calib: ``[n, seqlen]`` token ids the end-to-end distillation trains on (default: ``calib``;
            :func:`~llmprune.calibration.data.extend_calibration` makes them for ``recover.distill_nsamples``).

    Returns:
        A :class:`PruneReport`.
    """
    stages = [config] if isinstance(config, PruneConfig) else list(config)
    check_recovery(recover, stages, [method_for_config(s).kind for s in stages])
    if recover is not None and calib is None:
        raise ConfigError("recovery needs calibration data")
    block = recover.block if recover is not None else None
    check_sequential(sequential, recover)
    e2e = recover.e2e if recover is not None else None
    teacher = copy.deepcopy(model) if e2e is not None else None  # the dense model, before any pruning
    dev = resolve_device(device)
    report = PruneReport()
    t0 = time.perf_counter()
    was_training = model.training
    for stage in stages:
        method = method_for_config(stage)
        if method.needs_calibration and calib is None:
            raise ConfigError(f"method {method.name!r} needs calibration data")
    check_stages(model, stages)  # --ignore patterns match, N:M divides the pruned linears' input sizes
    model.eval()
    try:
        for stage in stages:
            method = method_for_config(stage)
            patterns = DEFAULT_IGNORE + tuple(stage.ignore)
            if method.kind == "model":
                check_model_finite(model, patterns)
                ctx = PruneContext(calib, dev, batch_size, progress, patterns)
                stage_reports = method.fn(model, stage, ctx)
                verify_model(model, [stage], stage_reports)
                report.modules.extend(stage_reports)
                continue
            compute = default_compute_dtype(model, dev)  # fp32 on CPU for 16-bit models, one layer at a time
            inputs = capture_inputs(model, calib, dev, batch_size, compute) if method.stats or block else None
            order = "layer"
            if method.stats:
                order = resolve_sequential(sequential, recover=block, tokens=calib.numel(), model_config=model.config,
                                           dtype=compute or next(model.parameters()).dtype, device=dev)
                report.sequential = order
            report.modules.extend(
                prune_layerwise(
                    model,
                    method,
                    stage,
                    inputs,
                    device=dev,
                    ignore=lambda name, p=patterns: matches_any(name, p),
                    progress=progress,
                    recover=block,
                    compute_dtype=compute,
                    sequential=order,
                )
            )
            del inputs
        if teacher is not None:
            data = calib if distill_calib is None else distill_calib
            report.distill = distill(model, teacher, data, e2e, device=dev, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


def compress(
    model_ref: str | None,
    recipe: Recipe,
    output: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    command: str | None = None,
    low_memory: bool | None = None,
    resume: bool = False,
    max_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
    dist_reduce: str = "exact",
    record_paths: str = "relative",
) -> CompressResult:
    """Load ``model_ref``, run the recipe's prune stages, save the checkpoint.

    Args:
        model_ref: alias (``smollm2-135m``), local directory or Hub id.
        recipe: stages, calibration, save format, runtime options.
        output: checkpoint directory (refused if it exists unless ``overwrite``).
        device: where layers run during pruning.
        dtype: model dtype (``auto`` = checkpoint's).
        overwrite: replace an existing output.
        progress: show progress bars.
        trust_remote_code: passed to transformers.
        command: the command line, recorded in the metadata.
        low_memory: stream the model layer by layer from its safetensors files and write the output shard by
            shard (:mod:`llmprune.engine.streaming`); None = automatic (when the weights exceed half the available RAM,
            or for ``resume`` / ``torchrun`` runs), False = always load the whole model.
        resume: continue an interrupted streaming run from ``<output>.partial`` (same result).
        max_memory: budget for calibration activations on the device (e.g. ``"20GiB"``); beyond it they live
            in CPU RAM (CUDA) or on disk (CPU).
        offload_dir: where activations spilled to disk go (default: inside ``<output>.partial``).
        dist_reduce: ``"exact"`` (bit-identical to one process) or ``"sum"`` (one all-reduce per statistic)
            for multi-process runs (:mod:`llmprune.calibration.distributed`).
        record_paths: how ``llmprune.json`` records local paths (base model, calibration file, command line):
            ``"relative"`` to the checkpoint directory (default; no user name or directory layout is recorded
            and the checkpoint can move with its model) or ``"absolute"``.

    Every input that can be checked before loading is checked first (flags, sizes, the offload directory,
    the output, the calibration file, the stages against the model's config); the loaded model's shapes are
    checked again before calibration, and the pruned weights before anything is saved.
    """
    if not recipe.stages:
        raise ConfigError("the recipe has no prune stages")
    # Everything that can be checked before loading, cheapest first; nothing is written until all passed.
    check_record_paths(record_paths)
    opts = StreamOptions(resume=resume, max_memory=max_memory, offload_dir=offload_dir, dist_reduce=dist_reduce)
    check_stream_options(opts)
    check_recovery(recipe.recover, recipe.stages, [method_for_config(s).kind for s in recipe.stages])
    recipe.validate()  # sections may have been changed after the recipe was built
    needs_calib = recipe_needs_calibration(recipe)
    if needs_calib:
        check_calib_source(recipe.calibration)
    fmt = get_format(recipe.save.format)
    if fmt.check is not None:
        fmt.check(recipe)
    dev = resolve_device(device)
    parse_dtype(dtype)
    resolved = resolve_model(model_ref)
    inputs = [resolved, recipe.calibration.source]
    # Never write over (or around) what the run reads: the model directory and a local calibration file.
    if resume and finished_output(Path(output).expanduser()):
        output = Path(output).expanduser()  # a streaming run interrupted after its final move: only clean up
    else:
        output = check_output(output, overwrite, inputs=inputs)
    check_offload_dir(offload_dir, inputs=inputs, output=output)
    stream_dir = use_streaming(resolved, recipe, low_memory=low_memory, resume=resume)
    preflight(resolved, recipe, dtype=dtype, device=dev, trust_remote_code=trust_remote_code,
               streaming=stream_dir is not None)
    if stream_dir is not None:
        return compress_streaming(model_ref if model_ref is not None else DEFAULT_MODEL, stream_dir, recipe, output,
                                  device=dev, dtype=dtype, overwrite=overwrite, progress=progress,
                                  trust_remote_code=trust_remote_code, command=command, options=opts,
                                  record_paths=record_paths)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    model = load_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
    check_stages(model, recipe.stages)  # the loaded shapes, before any calibration work
    calib = None
    calib_cfg = recipe.calibration
    if needs_calib:
        calib_cfg = clip_seqlen(calib_cfg, model.config)
        t_cal = time.perf_counter()
        calib, calib_cfg = load_calibration_resolved(calib_cfg, tokenizer, model, progress=progress)  # auto -> c4/self
        log.info("calibration data: %s in %.1fs", tuple(calib.shape), time.perf_counter() - t_cal)
    e2e = recipe.recover.e2e if recipe.recover is not None else None
    distill_calib = None
    if e2e is not None and e2e.distill_nsamples is not None:  # drawn now, from the dense model for source "self"
        distill_calib = extend_calibration(calib, calib_cfg, e2e.distill_nsamples, tokenizer, model, progress=progress)
    report = prune(model, recipe.stages, calib, device=dev, batch_size=calib_cfg.batch_size, progress=progress,
                   recover=recipe.recover, sequential=calib_cfg.sequential, distill_calib=distill_calib)
    if report.sequential is not None:  # recorded as resolved (auto -> module/layer), so the run can be repeated
        calib_cfg = dataclasses.replace(calib_cfg, sequential=report.sequential)
    verify_model(model, recipe.stages, report.modules)  # an internal error here: nothing is saved
    model.config.use_cache = True
    if recipe.save.dtype != "auto":  # save.dtype: the saved weights' dtype (pruned zeros stay zeros)
        model.to(parse_dtype(recipe.save.dtype))
        model.config.dtype = parse_dtype(recipe.save.dtype)
    save_format = recipe.save.format
    if save_format == "dense" and is_nonuniform(model):  # per-layer sizes (cfsp): plain "dense" cannot describe them
        save_format = "structured"
    metadata = build_metadata(
        base_model=model_ref or DEFAULT_MODEL, recipe=recipe, calibration=calib_cfg if calib is not None else None,
        report=report, dtype=next(model.parameters()).dtype, command=command,
        format=save_format if save_format != recipe.save.format else None,  # recorded when it differs
        output=output, record_paths=record_paths, base_is_path=model_is_path(model_ref),
    )
    path = save_checkpoint(model, tokenizer, output, metadata=metadata, format=save_format, overwrite=overwrite)
    return CompressResult(path, report, metadata)
