"""One streaming compress run on this rank: calibration, layer-0 capture, the layer loop, the final checkpoint.

:class:`StreamingRun` is what :func:`llmprune.engine.streaming.compress_streaming` drives; its steps share the
meta-device model, the output plan, the work directory and the calibration activations.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import LayerInputs, capture_layer_inputs, run_layer
from llmprune.calibration.data import clip_seqlen, load_calibration
from llmprune.calibration.distributed import (
    DistContext,
    broadcast_object,
    broadcast_tensor,
    make_reduction,
    owned_batches,
)
from llmprune.config import CalibConfig, Recipe
from llmprune.engine.activations import HiddenStore, store_mode
from llmprune.engine.options import SimulatedInterruption, StreamOptions, parse_size
from llmprune.engine.plan import (
    build_skeleton,
    load_tensors,
    move_buffers,
    plan_output,
    release_freed_memory,
    to_meta,
)
from llmprune.engine.resume import RunState, WorkDir, commit, fingerprint, start_or_resume
from llmprune.engine.source import SafetensorsSource
from llmprune.engine.step import prune_layer
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.checkpoint import METADATA_FILE, move_into_place
from llmprune.formats.metadata import build_metadata
from llmprune.formats.shards import ShardWriter
from llmprune.model.access import DEFAULT_IGNORE, decoder_layers, matches_any
from llmprune.model.device import to_device
from llmprune.model.loading import DEFAULT_MODEL, load_tokenizer
from llmprune.model.network import hub_reachable
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import CompressResult, PruneReport

log = logging.getLogger(__name__)


class StreamingRun:
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
        self.patterns = DEFAULT_IGNORE + tuple(self.stage.ignore)
        self.src = SafetensorsSource(path)
        self.model, _, self.dtype = build_skeleton(path, dtype, trust_remote_code)
        plan = plan_output(self.model, path, self.dtype, self.src)
        if isinstance(plan, str):
            raise ConfigError(f"cannot stream {path}: {plan}")
        self.plan = plan
        self.tokenizer = load_tokenizer(str(path), trust_remote_code)
        self.work = WorkDir.of(output)
        self.shard_size = parse_size(options.max_shard_size)
        # Set by run():
        self.calib_cfg: CalibConfig | None = None
        self.n_batches = 0  # calibration batches over all ranks
        self.mine: list[int] = []  # global calibration batches of this rank
        self.extra: LayerInputs | None = None  # their layer arguments besides the hidden states
        self.store: HiddenStore | None = None

    def run(self, model_ref: str | None, *, command: str | None, overwrite: bool, progress: bool) -> CompressResult:
        """Prune every layer (from the last committed one when resuming), then write the checkpoint."""
        ctx, opts = self.ctx, self.opts
        fp = fingerprint(self.path, self.recipe, self.dtype, ctx.world, opts.dist_reduce, self.shard_size)
        resumed = start_or_resume(self.work, fp, resume=opts.resume, ctx=ctx)
        state = resumed if resumed is not None else RunState(fp, len(self.plan.layer_keys))
        if resumed is not None:
            hidden_dir = Path(resumed.hidden_dir)
        elif opts.offload_dir:
            hidden_dir = Path(opts.offload_dir) / f"{self.output.name}.hidden"
        else:
            hidden_dir = self.work.root / "hidden"
        calib = self._calibration_ids(resumed)
        writer = self._open_writer(resumed is not None)
        if calib is not None:
            self._first_inputs(calib, resumed, hidden_dir, state.next_layer)
        state.calibration = self.calib_cfg.to_dict()
        state.store = self.store.mode if self.store else None
        state.hidden_dir = str(hidden_dir)
        if resumed is None:
            commit(self.work, state, ctx)
        self._prune_layers(state, writer, progress)
        report = PruneReport(state.reports, state.seconds)
        metadata = build_metadata(
            base_model=model_ref or DEFAULT_MODEL, recipe=self.recipe,
            calibration=self.calib_cfg if calib is not None else None, report=report, dtype=self.dtype,
            command=command, format=self.recipe.save.format,
            engine={"streaming": True, "world_size": ctx.world, "dist_reduce": opts.dist_reduce if ctx.enabled else None},
        )
        if ctx.is_main:
            writer.finish()
            self._finalize(metadata, overwrite, hidden_dir)
            log.info("streamed checkpoint to %s in %.1fs", self.output, time.perf_counter() - self.t_start)
        ctx.barrier()
        self.src.close()
        return CompressResult(self.output, report, metadata)

    def _calibration_ids(self, resumed: RunState | None) -> torch.Tensor | None:
        """``[nsamples, seqlen]`` calibration ids on every rank (rank 0 loads them; saved for ``--resume``)."""
        ctx, calib = self.ctx, None
        if resumed is not None:
            if ctx.is_main and self.work.calib.is_file():
                calib = torch.load(self.work.calib, weights_only=True)
            self.calib_cfg = CalibConfig(**resumed.calibration)
        elif ctx.is_main:
            self.calib_cfg = self.recipe.calibration
            if self.method.needs_calibration:
                t_cal = time.perf_counter()
                calib = self._load_calibration()
                log.info("calibration data: %s in %.1fs", tuple(calib.shape), time.perf_counter() - t_cal)
                torch.save(calib, self.work.calib)
        self.calib_cfg = broadcast_object(self.calib_cfg, ctx)
        if not broadcast_object(calib is not None, ctx):
            return None
        if ctx.enabled:
            calib = broadcast_tensor(calib.to(self.device) if ctx.is_main else None, ctx, self.device).cpu()
        return calib

    def _load_calibration(self) -> torch.Tensor:
        """Rank 0: the recipe's calibration ids (``seqlen`` clipped to the model's context)."""
        self.calib_cfg = clip_seqlen(self.calib_cfg, self.plan.config)
        source = self.calib_cfg.source
        needs_model = source == "self" or (source == "auto" and not hub_reachable())
        model = None
        if needs_model:  # sampling from the model: accelerate big-model inference, offloading what does not fit
            from transformers import AutoModelForCausalLM

            offload = str(self.opts.offload_dir or self.work.root / "offload")
            kw = {"dtype": self.plan.dtype, "device_map": "auto", "offload_folder": offload}
            if self.opts.max_memory is not None:
                kw["max_memory"] = {"cpu": parse_size(self.opts.max_memory)}
            model = AutoModelForCausalLM.from_pretrained(self.path, trust_remote_code=self.trust_remote_code, **kw)
            model.eval()
        return load_calibration(self.calib_cfg, self.tokenizer, model)

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

    def _first_inputs(self, calib: torch.Tensor, resumed: RunState | None, hidden_dir: Path, start: int) -> None:
        """This rank's batches and their inputs of layer ``start`` (captured at layer 0, or saved ones)."""
        device, ctx, plan, model = self.device, self.ctx, self.plan, self.model
        batch_size = self.calib_cfg.batch_size
        self.n_batches = math.ceil(calib.shape[0] / batch_size)
        self.mine = owned_batches(self.n_batches, ctx)
        hidden = None
        if resumed is None:
            keys = plan.other_keys + plan.layer_keys[0]
            load_tensors(model, keys, self.src, plan, "cpu")
            local_ids = torch.cat([calib[g * batch_size:(g + 1) * batch_size] for g in self.mine]) if self.mine else None
            captured = capture_layer_inputs(model, local_ids, device, batch_size) if self.mine else LayerInputs()
            to_meta(model, keys)
            model.tie_weights()
            self.extra = LayerInputs([], captured.args, captured.kwargs)
            cpu = torch.device("cpu")
            torch.save({"args": to_device(captured.args, cpu), "kwargs": to_device(captured.kwargs, cpu)},
                       self.work.inputs(ctx.rank))
            hidden = dict(zip(self.mine, captured.hidden))
            del captured
            nbytes = broadcast_object(sum(t.numel() * t.element_size() for t in hidden.values()), ctx, 0)
            mode = store_mode(nbytes, device, parse_size(self.opts.max_memory))
        else:
            saved = torch.load(self.work.inputs(ctx.rank), weights_only=True)
            self.extra = LayerInputs([], to_device(saved["args"], device), to_device(saved["kwargs"], device))
            mode = resumed.store
        self.store = HiddenStore(mode, device, hidden_dir)
        self.store.init(start, hidden, self.mine)

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
        t_run = time.perf_counter()
        bar = tqdm(range(start, n_layers), desc=f"{self.method.name} {self.stage.sparsity}", unit="layer",
                   disable=not progress or not ctx.is_main, initial=start, total=n_layers)
        for idx in bar:
            if self.opts.stop_after is not None and idx - start >= self.opts.stop_after:
                raise SimulatedInterruption(f"stopped before layer {idx}")
            layer, keys = layers[idx], plan.layer_keys[idx]
            load_tensors(model, keys, self.src, plan, self.device)
            self.src.close()  # unmap: pages of finished layers leave the process's RSS
            move_buffers(layer, self.device)  # non-persistent buffers (rotary tables of some architectures)
            batches = [partial(self._run_batch, layer, g) for g in self.mine]
            state.reports.extend(prune_layer(layer, idx, plan.prefix, self.method, self.stage, batches,
                                             device=self.device, ignore=self._ignore,
                                             reduce=reduction))
            last = idx + 1 == n_layers
            if store is not None and not last:
                for g in self.mine:
                    store.put(g, self._run_batch(layer, g))
            if writer is not None:
                sd = model.state_dict(keep_vars=True)
                for k in keys:
                    writer.write(k, sd[k].detach())
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
        shutil.rmtree(self.work.root, ignore_errors=True)
        shutil.rmtree(hidden_dir, ignore_errors=True)
