"""Public entry points: :func:`prune` (in memory) and :func:`compress` (load -> prune -> save).

The CLI and the eval scripts are thin wrappers over these.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.calibration.capture import capture_layer_inputs
from llmprune.calibration.data import clip_seqlen, load_calibration
from llmprune.config import PruneConfig, Recipe
from llmprune.engine.layerwise import prune_layerwise
from llmprune.engine.streaming import StreamOptions, compress_streaming, use_streaming
from llmprune.errors import ConfigError
from llmprune.formats.checkpoint import check_output, get_format, save_checkpoint
from llmprune.formats.metadata import build_metadata
from llmprune.model.access import DEFAULT_IGNORE, matches_any
from llmprune.model.device import resolve_device
from llmprune.model.loading import DEFAULT_MODEL, load_pretrained, load_tokenizer, resolve_model
from llmprune.model.structured import is_nonuniform
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import CompressResult, PruneReport

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

    Returns:
        A :class:`PruneReport`.
    """
    stages = [config] if isinstance(config, PruneConfig) else list(config)
    dev = resolve_device(device)
    report = PruneReport()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for stage in stages:
            method = method_for_config(stage)
            if method.needs_calibration and calib is None:
                raise ConfigError(f"method {method.name!r} needs calibration data")
            patterns = DEFAULT_IGNORE + tuple(stage.ignore)
            if method.kind == "model":
                ctx = PruneContext(calib, dev, batch_size, progress, patterns)
                report.modules.extend(method.fn(model, stage, ctx))
                continue
            inputs = capture_layer_inputs(model, calib, dev, batch_size) if method.stats else None
            report.modules.extend(
                prune_layerwise(
                    model,
                    method,
                    stage,
                    inputs,
                    device=dev,
                    ignore=lambda name, p=patterns: matches_any(name, p),
                    progress=progress,
                )
            )
            del inputs
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
    """
    if not recipe.stages:
        raise ConfigError("the recipe has no prune stages")
    resolved = resolve_model(model_ref)
    # Never write over (or around) what the run reads: the model directory and a local calibration file.
    output = check_output(output, overwrite, inputs=[resolved, recipe.calibration.source])
    fmt = get_format(recipe.save.format)
    if fmt.check is not None:
        fmt.check(recipe)
    dev = resolve_device(device)
    stream_dir = use_streaming(resolved, recipe, low_memory=low_memory, resume=resume)
    if stream_dir is not None:
        opts = StreamOptions(resume=resume, max_memory=max_memory, offload_dir=offload_dir, dist_reduce=dist_reduce)
        return compress_streaming(model_ref, stream_dir, recipe, output, device=dev, dtype=dtype, overwrite=overwrite,
                                  progress=progress, trust_remote_code=trust_remote_code, command=command, options=opts)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    model = load_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
    calib = None
    calib_cfg = recipe.calibration
    if any(method_for_config(s).needs_calibration for s in recipe.stages):
        calib_cfg = clip_seqlen(calib_cfg, model.config)
        t_cal = time.perf_counter()
        calib = load_calibration(calib_cfg, tokenizer, model)
        log.info("calibration data: %s in %.1fs", tuple(calib.shape), time.perf_counter() - t_cal)
    report = prune(model, recipe.stages, calib, device=dev, batch_size=calib_cfg.batch_size, progress=progress)
    model.config.use_cache = True
    save_format = recipe.save.format
    if save_format == "dense" and is_nonuniform(model):  # per-layer sizes (cfsp): plain "dense" cannot describe them
        save_format = "structured"
    metadata = build_metadata(
        base_model=model_ref or DEFAULT_MODEL, recipe=recipe, calibration=calib_cfg if calib is not None else None,
        report=report, dtype=next(model.parameters()).dtype, command=command,
        format=save_format if save_format != recipe.save.format else None,  # recorded when it differs
    )
    path = save_checkpoint(model, tokenizer, output, metadata=metadata, format=save_format, overwrite=overwrite)
    return CompressResult(path, report, metadata)
