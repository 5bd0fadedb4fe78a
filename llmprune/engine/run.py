"""One streaming compress run on this rank: calibration, layer-0 capture, the layer loop, the final checkpoint.

:class:`StreamingRun` is what :func:`llmprune.engine.streaming.compress_streaming` drives; its steps share the
meta-device model, the output plan, the work directory and the calibration activations. The steps before the
layer loop (calibration ids, layer-0 capture) are in :mod:`llmprune.engine.calibration_phase`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import LayerInputs, run_layer
from llmprune.calibration.distributed import DistContext, broadcast_object, make_all_reduce, make_reduction
from llmprune.config import CalibConfig, Recipe
from llmprune.engine.activations import HiddenStore, check_activation_memory
from llmprune.engine.calibration_phase import CalibrationPhase
from llmprune.engine.layerwise import compute_dtype_for
from llmprune.engine.onepass import prune_layer_one_pass
from llmprune.engine.options import SimulatedInterruption, StreamOptions, parse_size
from llmprune.engine.plan import (
    build_skeleton,
    load_tensors,
    move_buffers,
    plan_output,
    release_freed_memory,
    to_meta,
)
from llmprune.engine.resume import RunState, commit, fingerprint, relative_source, start_or_resume
from llmprune.engine.sequential import resolve_sequential, uses_one_pass
from llmprune.engine.source import SafetensorsSource
from llmprune.engine.step import check_stages, prune_layer
from llmprune.engine.workdir import (
    RunLock,
    WorkDir,
    finished_output,
    hidden_spec,
    remove_work_dir,
    resolve_hidden,
)
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.checkpoint import METADATA_FILE, move_into_place, read_metadata
from llmprune.formats.metadata import build_metadata
from llmprune.formats.shards import ShardWriter
from llmprune.model.access import DEFAULT_IGNORE, decoder_layers, hidden_size, matches_any
from llmprune.model.loading import ALIASES, load_tokenizer
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import CompressResult, PruneReport
from llmprune.recover.batches import Schedule

log = logging.getLogger(__name__)


def model_is_path(ref: str | os.PathLike | None) -> bool:
    """Whether a model reference names a local directory (not an alias or a Hub id), as resolved by
    :func:`llmprune.model.loading.resolve_model` (aliases first)."""
    return ref is not None and str(ref).lower() not in ALIASES and Path(ref).expanduser().exists()


class StreamingRun(CalibrationPhase):
    """A streaming compress of the safetensors checkpoint ``path`` into ``output`` (this rank's part).

    Building it reads the model's layout (meta device) and the tokenizer; :meth:`run` does the rest.
    """

    def __init__(self, path: Path, recipe: Recipe, output: Path, *, device: torch.device, ctx: DistContext,
                 options: StreamOptions, dtype: str = "auto", trust_remote_code: bool = False) -> None:
        self.t_start = time.perf_counter()
        self.path, self.recipe, self.output = path, recipe, output
        self.device, self.ctx, self.opts = device, ctx, options
        self.trust_remote_code = trust_remote_code
        self.stage = recipe.stages[0]
        self.method = method_for_config(self.stage)
        rec = recipe.recover
        self.recover = rec.block if rec is not None else None  # block recovery per layer
        self.needs_calibration = self.method.needs_calibration or self.recover is not None
        self.patterns = DEFAULT_IGNORE + tuple(self.stage.ignore)
        self.src = SafetensorsSource(path)
        self.model, _, self.dtype = build_skeleton(path, dtype, trust_remote_code)
        plan = plan_output(self.model, path, self.dtype, self.src)
        if isinstance(plan, str):
            raise ConfigError(f"cannot stream {path}: {plan}")
        self.plan = plan
        check_stages(self.model, [self.stage])  # --ignore patterns and N:M shapes, before any work
        self.work = WorkDir.of(output)
        self.shard_size = parse_size(options.max_shard_size)
        if self.needs_calibration and not (options.resume and self.work.state.is_file()):
            cal, hidden = recipe.calibration, hidden_size(self.plan.config)
            seqlen = min(cal.seqlen, getattr(self.plan.config, "max_position_embeddings", None) or cal.seqlen)
            if hidden is not None:
                disk = resolve_hidden(self.work, hidden_spec(output, options.offload_dir), options.offload_dir)
                check_activation_memory(cal.nsamples, seqlen, hidden, self.dtype, device=device, streaming=True,
                                        disk_dir=disk)
        self.tokenizer = load_tokenizer(str(path), trust_remote_code)
        # Set by run():
        self.calib_cfg: CalibConfig | None = None
        self.n_batches = 0  # calibration batches over all ranks
        self.mine: list[int] = []  # global calibration batches of this rank
        self.extra: LayerInputs | None = None  # their layer arguments besides the hidden states
        self.store: HiddenStore | None = None

    def run(self, model_ref: str | None, *, command: str | None, overwrite: bool, progress: bool,
            record_paths: str = "relative") -> CompressResult:
        """Prune every layer (from the last committed one when resuming), then write the checkpoint.

        Args:
            model_ref: the model as the user named it (recorded in the metadata; None: the source directory).
        """
        ctx, opts = self.ctx, self.opts
        fp = fingerprint(self.path, self.recipe, self.dtype, ctx.world, opts.dist_reduce, self.shard_size)
        lock = RunLock(self.work.lock) if ctx.is_main else None
        try:
            resumed, hidden_dir = start_or_resume(self.work, fp, resume=opts.resume, ctx=ctx,
                                                  n_layers=len(self.plan.layer_keys), output=self.output,
                                                  offload_dir=opts.offload_dir, lock=lock)
            if resumed is not None and resumed.next_layer == resumed.n_layers and finished_output(self.output):
                return self._already_done(resumed, hidden_dir)
            return self._run(resumed, hidden_dir, fp, model_ref, command=command, overwrite=overwrite,
                             progress=progress, record_paths=record_paths)
        finally:
            if lock is not None:
                lock.release()
            self.src.close()

    def _run(self, resumed: RunState | None, hidden_dir: Path, fp: str, model_ref: str | None, *,
             command: str | None, overwrite: bool, progress: bool, record_paths: str) -> CompressResult:
        ctx, opts = self.ctx, self.opts
        state = resumed if resumed is not None else RunState(fp, len(self.plan.layer_keys))
        calib = self._calibration_ids(resumed)
        writer = self._open_writer(resumed is not None)
        if calib is not None:
            self._first_inputs(calib, resumed, hidden_dir, state.next_layer)
            self._resolve_sequential(calib, resumed)
            state.calibration = relative_source(self.calib_cfg.to_dict(), self.work)
            state.store = self.store.mode
            state.hidden = hidden_spec(self.output, opts.offload_dir) if resumed is None else resumed.hidden
        if resumed is None:
            commit(self.work, state, ctx)
        self._prune_layers(state, writer, progress)
        if opts.stop_after is not None and state.n_layers - (resumed.next_layer if resumed else 0) >= opts.stop_after:
            raise SimulatedInterruption("stopped after the last layer, before the checkpoint was moved into place")
        report = PruneReport(state.reports, state.seconds)
        metadata = build_metadata(
            base_model=model_ref if model_ref is not None else str(self.path), recipe=self.recipe,
            calibration=self.calib_cfg if calib is not None else None, report=report, dtype=self.dtype,
            command=command, format=self.recipe.save.format,
            engine={"streaming": True, "world_size": ctx.world, "dist_reduce": opts.dist_reduce if ctx.enabled else None},
            output=self.output, record_paths=record_paths,
            base_is_path=model_is_path(model_ref) if model_ref is not None else True,
        )
        if ctx.is_main:
            writer.finish()
            self._finalize(metadata, overwrite, hidden_dir)
            log.info("streamed checkpoint to %s in %.1fs", self.output, time.perf_counter() - self.t_start)
        ctx.barrier()
        return CompressResult(self.output, report, metadata)

    def _resolve_sequential(self, calib: torch.Tensor, resumed: RunState | None) -> None:
        """``calibration.sequential`` as this run takes it, the same on every rank (rank 0 decides): the
        one-pass order needs the activations in memory and a calibration batch on every rank. A resumed run
        keeps what it recorded (a state without the key predates the one-pass order: ``layer``)."""
        requested = self.calib_cfg.sequential
        if resumed is not None and resumed.calibration is not None and "sequential" not in resumed.calibration:
            requested = "layer"
        order = requested
        if self.method.stats and requested == "auto":
            allowed = self.store.mode != "disk" and self.n_batches >= self.ctx.world
            order = resolve_sequential(requested, recover=self.recover, tokens=calib.numel() // self.ctx.world,
                                       model_config=self.plan.config, device=self.device, allowed=allowed,
                                       dtype=compute_dtype_for(self.dtype, self.device) or self.dtype)
        order = broadcast_object(order, self.ctx)
        self.calib_cfg = dataclasses.replace(self.calib_cfg, sequential=order)

    def _already_done(self, state: RunState, hidden_dir: Path) -> CompressResult:
        """``--resume`` of a run interrupted after its checkpoint was moved into place: only clean up."""
        log.info("%s was already complete; removing what the interrupted run left in %s", self.output, self.work.root)
        metadata = read_metadata(self.output) or {}
        if self.ctx.is_main:
            remove_work_dir(self.work, hidden_dir)
        self.ctx.barrier()
        return CompressResult(self.output, PruneReport(state.reports, state.seconds), metadata)

    def _open_writer(self, reopen: bool) -> ShardWriter | None:
        """Rank 0: the output shards, with the tensors outside the decoder layers copied in on a fresh start."""
        writer = None
        if self.ctx.is_main:
            plan = self.plan
            writer = ShardWriter(self.work.ckpt, [(k, plan.dtypes[k], plan.shapes[k]) for k in plan.keys],
                                 self.shard_size, reopen=reopen)
            if not reopen:
                for k in plan.other_keys:  # embeddings, final norm, head: unchanged, copied from the source
                    writer.write(k, self.src.get(k).to(plan.dtypes[k]))
                writer.flush()
            self.src.close()
        return writer

    def _ignore(self, name: str) -> bool:
        return matches_any(name, self.patterns)

    def _run_batch(self, layer: nn.Module, g: int) -> torch.Tensor:
        """Output hidden states ``[b, s, hidden]`` of ``layer`` for this rank's global batch ``g``."""
        j = self.mine.index(g)
        return run_layer(layer, LayerInputs([self.store.get(g)], [self.extra.args[j]], [self.extra.kwargs[j]]), 0)

    def _prune_layers(self, state: RunState, writer: ShardWriter | None, progress: bool) -> None:
        """Prune, propagate, write and commit every layer from ``state.next_layer`` on."""
        ctx, plan, model, store = self.ctx, self.plan, self.model, self.store
        layers = decoder_layers(model)
        n_layers, start = len(layers), state.next_layer
        seconds_before = state.seconds
        reduction = make_reduction(ctx, self.opts.dist_reduce, self.n_batches, self.device)
        schedule = Schedule(tuple(self.mine), self.n_batches) if self.recover is not None else None
        all_reduce = make_all_reduce(ctx)
        compute = compute_dtype_for(self.dtype, self.device)
        t_run = time.perf_counter()
        one_pass = self.calib_cfg is not None and uses_one_pass(self.calib_cfg.sequential, self.method, self.recover)
        bar = tqdm(range(start, n_layers), desc=f"{self.method.name} {self.stage.sparsity}", unit="layer",
                   disable=not progress or not ctx.is_main, initial=start, total=n_layers)
        for idx in bar:
            if self.opts.stop_after is not None and idx - start >= self.opts.stop_after:
                raise SimulatedInterruption(f"stopped before layer {idx}")
            layer, keys = layers[idx], plan.layer_keys[idx]
            load_tensors(model, keys, self.src, plan, self.device)
            self.src.close()  # unmap: pages of finished layers leave the process's RSS
            move_buffers(layer, self.device)  # non-persistent buffers (rotary tables of some architectures)
            if compute is not None:
                layer.to(compute)  # fp32 on the CPU for a 16-bit model, as the in-memory loop; written back below
            batches = [partial(self._run_batch, layer, g) for g in self.mine]
            last = idx + 1 == n_layers
            if one_pass:
                layer_reports, outputs = prune_layer_one_pass(layer, idx, plan.prefix, self.method, self.stage,
                                                              batches, device=self.device, ignore=self._ignore,
                                                              reduce=reduction)
                state.reports.extend(layer_reports)
                if not last:
                    for g, out in zip(self.mine, outputs):
                        store.put(g, out)
                del outputs
            else:
                state.reports.extend(prune_layer(layer, idx, plan.prefix, self.method, self.stage, batches,
                                                 device=self.device, ignore=self._ignore,
                                                 reduce=reduction, recover=self.recover, schedule=schedule,
                                                 all_reduce=all_reduce, progress=progress and ctx.is_main))
                if store is not None and not last:
                    for g in self.mine:
                        store.put(g, self._run_batch(layer, g))
            if writer is not None:
                sd = model.state_dict(keep_vars=True)
                for k in keys:
                    writer.write(k, sd[k].detach().to(plan.dtypes[k]))  # the model's own dtype
                writer.flush()
            to_meta(model, keys)
            move_buffers(layer, torch.device("cpu"))
            release_freed_memory()
            if store is not None and not last:
                store.advance()
            state.next_layer, state.seconds = idx + 1, seconds_before + time.perf_counter() - t_run
            commit(self.work, state, ctx)
            if store is not None and not last:
                store.drop(idx)
        state.seconds = seconds_before + time.perf_counter() - t_run

    def _finalize(self, metadata: dict, overwrite: bool, hidden_dir: Path) -> None:
        """Rank 0: config, generation config, tokenizer and metadata beside the shards; then into place."""
        from transformers import GenerationConfig

        model, ckpt = self.model, self.work.ckpt
        model.config.use_cache = True
        model.config.save_pretrained(ckpt)
        try:
            gen = GenerationConfig.from_pretrained(self.path)
        except (OSError, ValueError):
            gen = GenerationConfig.from_model_config(model.config) if model.can_generate() else None
        if gen is not None:
            gen.save_pretrained(ckpt)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(ckpt)
        (ckpt / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.output.exists() and not overwrite:
            raise LlmpruneError(f"output {self.output} already exists (pass --overwrite to replace it)")
        move_into_place(ckpt, self.output)
        remove_work_dir(self.work, hidden_dir)
