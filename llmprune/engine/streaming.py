"""Streaming compress: prune a model larger than device memory, or CPU RAM, one decoder layer at a time.

The model is built on the meta device (:mod:`llmprune.engine.plan`), so building it costs no memory; its
weights stay in the memory-mapped safetensors files (:mod:`llmprune.engine.source`). For each decoder layer the
run materializes that layer's tensors straight onto the device, prunes it with the same per-layer step as the
in-memory loop (:func:`llmprune.engine.step.prune_layer`), re-runs it so the pruned outputs feed the next layer,
writes its tensors into the output shards (:class:`llmprune.formats.shards.ShardWriter`) and returns it to the
meta device. The embeddings/head are materialized only for the capture of layer 0's inputs. Calibration
activations of the current layer are the only other large state (:mod:`llmprune.engine.activations`).

Output shards are planned up front from the model's shapes and dtypes, so each layer's tensors are written to
their final place as soon as the layer is done; the whole state dict is never in memory. Everything is written
under ``<output>.partial/`` and renamed to ``<output>`` at the end, so an interrupted run continues with
``resume=True`` (CLI ``--resume``) from the last finished layer and produces the same checkpoint as an
uninterrupted run (:mod:`llmprune.engine.resume`).

Under ``torchrun`` every rank runs its share of the calibration batches and the statistics are combined with
:mod:`llmprune.calibration.distributed`; rank 0 writes the checkpoint.

When it is used (``low_memory``): ``True`` always (error if impossible), ``False`` never, ``None`` (default)
when the checkpoint is local safetensors whose size exceeds half the available RAM, or when ``resume`` or a
multi-process launch asks for it. Supported: one prune stage of a per-linear method (magnitude, Wanda,
SparseGPT, or any method registered with ``kind="linear"``), the ``dense`` format.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from llmprune.calibration.distributed import REDUCTIONS, env_world_size, setup
from llmprune.config import Recipe
from llmprune.engine.activations import available_ram as _available_ram
from llmprune.engine.options import SimulatedInterruption, StreamOptions, parse_size
from llmprune.engine.run import StreamingRun
from llmprune.engine.source import SafetensorsSource, hub_safetensors, local_safetensors
from llmprune.engine.workdir import finished_output
from llmprune.errors import ConfigError
from llmprune.formats.checkpoint import check_output
from llmprune.formats.output import is_within, nearest_existing, unwritable_reason
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import CompressResult

__all__ = [
    "SimulatedInterruption",
    "StreamOptions",
    "check_offload_dir",
    "check_stream_options",
    "compress_streaming",
    "parse_size",
    "unsupported_reason",
    "use_streaming",
]

log = logging.getLogger(__name__)


def check_offload_dir(
    offload_dir: str | os.PathLike | None, *, inputs: Iterable[str | os.PathLike] = (), output: str | os.PathLike | None = None
) -> Path | None:
    """``--offload-dir`` must be a directory that exists or can be created, writable, and neither inside an input
    (the model directory) nor inside the output. Nothing is created.

    Returns:
        The directory (``~`` expanded), or None when not given.

    Raises:
        ConfigError: naming the directory and what is wrong with it.
    """
    if offload_dir is None:
        return None
    if not str(offload_dir).strip():
        raise ConfigError("--offload-dir must be a directory, got an empty string")
    d = Path(offload_dir).expanduser()
    resolved = d.resolve()
    for ref in inputs:
        p = Path(ref).expanduser()
        if p.is_dir() and is_within(resolved, p.resolve()):
            raise ConfigError(f"--offload-dir {offload_dir} is inside the input {ref}; choose a directory outside it")
    if output is not None and is_within(resolved, Path(output).expanduser().resolve()):
        raise ConfigError(f"--offload-dir {offload_dir} is inside the output {output}; choose a directory outside it")
    anc = nearest_existing(d)
    if not anc.is_dir():
        what = "is not a directory" if anc == d else f"cannot be created ({anc} is not a directory)"
        raise ConfigError(f"--offload-dir {offload_dir} {what}")
    reason = unwritable_reason(anc)
    if reason is not None:
        where = "" if anc == d else f" ({anc} is not writable)"
        raise ConfigError(f"--offload-dir {offload_dir} is not writable{where}: {reason}")
    return d


def check_stream_options(opts: StreamOptions, *, inputs: Iterable[str | os.PathLike] = (),
                         output: str | os.PathLike | None = None) -> None:
    """The streaming options that can be checked before any work: sizes, the reduction, the offload directory.

    Raises:
        ConfigError: naming the option.
    """
    try:
        parse_size(opts.max_memory)
    except ConfigError as exc:
        raise ConfigError(f"--max-memory: {exc}") from None
    try:
        if not parse_size(opts.max_shard_size):
            raise ConfigError(f"invalid size {opts.max_shard_size!r} (must be > 0)")
    except ConfigError as exc:
        raise ConfigError(f"max_shard_size: {exc}") from None
    if opts.dist_reduce not in REDUCTIONS:
        raise ConfigError(f"dist_reduce must be one of {', '.join(REDUCTIONS)}, got {opts.dist_reduce!r}")
    check_offload_dir(opts.offload_dir, inputs=inputs, output=output)


def unsupported_reason(recipe: Recipe) -> str | None:
    """Why a recipe cannot run through the streaming engine (None: it can)."""
    if len(recipe.stages) != 1:
        return "streaming runs exactly one prune stage (multi-stage recipes need the in-memory path)"
    method = method_for_config(recipe.stages[0])
    if method.kind != "linear":
        return f"method {method.name!r} is a whole-model method"
    if recipe.save.format != "dense":
        return f"format {recipe.save.format!r} needs the whole model in memory"
    if recipe.recover is not None and recipe.recover.e2e is not None:
        return f"end-to-end recovery (recover {recipe.recover.mode}) needs the whole model in memory"
    if recipe.save.dtype != "auto":
        return "save.dtype other than auto needs the in-memory path (stream with --dtype instead)"
    return None


def use_streaming(resolved: str, recipe: Recipe, *, low_memory: bool | None, resume: bool) -> Path | None:
    """Decide whether :func:`llmprune.api.compress` streams; returns the safetensors directory if so.

    Raises :class:`ConfigError` when streaming is required (``low_memory=True``, ``resume``, ``torchrun``) but
    impossible.
    """
    required = bool(low_memory) or resume or env_world_size() > 1
    if low_memory is False:
        if resume or env_world_size() > 1:
            raise ConfigError("--resume and multi-process runs need the streaming engine (drop --no-low-memory)")
        return None
    reason = unsupported_reason(recipe)
    path = local_safetensors(resolved)
    if path is None and required and not Path(resolved).exists():
        path = hub_safetensors(resolved)
    if path is None and reason is None:
        reason = f"{resolved} is not a safetensors checkpoint directory"
    if reason is None and not required:
        size, ram = SafetensorsSource(path).total_bytes(), _available_ram()
        if size <= ram // 2:
            return None
        log.info("weights (%.1f GiB) exceed half the available RAM (%.1f GiB): streaming", size / 2**30, ram / 2**30)
    if reason is not None:
        if required:
            raise ConfigError(f"low-memory/resumable/distributed compress is not possible: {reason}")
        return None
    return path


def compress_streaming(
    model_ref: str | None,
    path: Path,
    recipe: Recipe,
    output: str | Path,
    *,
    device: torch.device,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    command: str | None = None,
    options: StreamOptions | None = None,
    record_paths: str = "relative",
) -> CompressResult:
    """Streaming, resumable, optionally distributed compress of a safetensors checkpoint.

    Same arguments and result as :func:`llmprune.api.compress` (which calls this when it streams) plus
    ``path`` (the safetensors directory) and ``options``. Produces the same tensors as the in-memory path.
    ``model_ref`` None records ``path`` as the base model.

    Every option is checked before any model or calibration work (:func:`check_stream_options`); the model's
    structure (``ignore`` patterns, N:M shapes) and the activations' size right after the meta-device model is
    built, before calibration.
    """
    opts = options or StreamOptions()
    inputs = [path, recipe.calibration.source]
    check_stream_options(opts, inputs=inputs, output=output)
    reason = unsupported_reason(recipe)
    if reason:
        raise ConfigError(reason)
    if opts.resume and finished_output(Path(output).expanduser()):
        output = Path(output).expanduser()  # only its leftover work directory is removed (StreamingRun.run)
    else:
        output = check_output(output, overwrite, inputs=inputs)
    ctx, device = setup(device)
    try:
        run = StreamingRun(Path(path), recipe, output, device=device, ctx=ctx, options=opts, dtype=dtype,
                           trust_remote_code=trust_remote_code)
        return run.run(model_ref, command=command, overwrite=overwrite, progress=progress, record_paths=record_paths)
    finally:
        ctx.close()
