"""The calibration phase of a streaming run: the calibration ids and this rank's inputs of the first layer.

:class:`CalibrationPhase` holds the steps of :class:`~llmprune.engine.run.StreamingRun` that come before the
layer loop: the calibration ids (loaded by rank 0 and saved into the work directory, or read back from it when
resuming) and each rank's batches with their inputs of the first layer to run (captured at layer 0 one batch at
a time, or the ones an interrupted run saved).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from llmprune.calibration.capture import LayerInputs, capture_layer_inputs
from llmprune.calibration.data import clip_seqlen, load_calibration_resolved
from llmprune.calibration.distributed import DistContext, broadcast_object, broadcast_tensor, owned_batches
from llmprune.config import CalibConfig, Recipe
from llmprune.engine.activations import HiddenStore, available_ram, batch_shapes, store_mode
from llmprune.engine.layerwise import compute_dtype_for
from llmprune.engine.options import StreamOptions, parse_size
from llmprune.engine.plan import Plan, load_tensors, to_meta
from llmprune.engine.resume import RunState
from llmprune.engine.source import SafetensorsSource
from llmprune.engine.workdir import WorkDir
from llmprune.errors import LlmpruneError
from llmprune.formats.reading import load_torch
from llmprune.model.device import to_device
from llmprune.model.network import hub_reachable
from llmprune.prune.registry import Method

log = logging.getLogger(__name__)


def _load_saved(path: Path, what: str, work: WorkDir):
    """A torch file this run saved, read with :func:`~llmprune.formats.reading.load_torch` (``weights_only``);
    a missing or damaged one is one clear error."""
    if not path.is_file():
        raise LlmpruneError(f"{what} of the interrupted run is missing ({path}); {work.hint()}")
    try:
        return load_torch(path, map_location="cpu")
    except LlmpruneError as exc:
        raise LlmpruneError(f"{what}: {exc}; {work.hint()}") from None


class CalibrationPhase:
    """The calibration steps of :class:`~llmprune.engine.run.StreamingRun` (a base class of it).

    They read the run's settings and set the calibration state the layer loop uses: ``calib_cfg``,
    ``n_batches``, ``mine``, ``extra`` and ``store``.
    """

    # Set by StreamingRun.__init__:
    path: Path
    recipe: Recipe
    device: torch.device
    ctx: DistContext
    opts: StreamOptions
    trust_remote_code: bool
    method: Method
    needs_calibration: bool  # the method's, or block recovery's
    src: SafetensorsSource
    model: torch.nn.Module
    plan: Plan
    work: WorkDir
    tokenizer: object
    # Set by these steps:
    calib_cfg: CalibConfig | None
    n_batches: int
    mine: list[int]
    extra: LayerInputs | None
    store: HiddenStore | None

    def _calibration_ids(self, resumed: RunState | None) -> torch.Tensor | None:
        """``[nsamples, seqlen]`` calibration ids on every rank (rank 0 loads them; saved for ``--resume``)."""
        ctx, calib, error = self.ctx, None, None
        if resumed is not None:
            if (resumed.calibration is not None) != self.needs_calibration:
                raise LlmpruneError(f"{self.work.state} does not match the method {self.method.name!r} "
                                    f"(calibration {'recorded' if resumed.calibration else 'missing'}); "
                                    f"{self.work.hint()}")
            if resumed.calibration is not None:
                # the source as the current command names it (the fingerprint says it is the same file)
                # (an ``auto`` source keeps what it resolved to, as recorded)
                source = self.recipe.calibration.source
                if source == "auto" and resumed.calibration.get("source") in ("c4", "self"):
                    source = resumed.calibration["source"]
                self.calib_cfg = CalibConfig(**{**resumed.calibration, "source": source})
            else:
                self.calib_cfg = self.recipe.calibration
            if ctx.is_main and resumed.calibration is not None:
                try:
                    calib = _load_saved(self.work.calib, "calibration data", self.work)
                    cfg = self.calib_cfg
                    if not (isinstance(calib, torch.Tensor) and calib.dtype == torch.int64
                            and tuple(calib.shape) == (cfg.nsamples, cfg.seqlen)):
                        raise LlmpruneError(f"calibration data {self.work.calib} is not the [{cfg.nsamples}, "
                                            f"{cfg.seqlen}] token ids state.json describes; {self.work.hint()}")
                except LlmpruneError as exc:
                    error = str(exc)
        elif ctx.is_main:
            self.calib_cfg = self.recipe.calibration
            if self.needs_calibration:
                t_cal = time.perf_counter()
                calib = self._load_calibration()
                log.info("calibration data: %s in %.1fs", tuple(calib.shape), time.perf_counter() - t_cal)
                torch.save(calib, self.work.calib)
        error = broadcast_object(error, ctx)
        if error:
            raise LlmpruneError(error)
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
        calib, self.calib_cfg = load_calibration_resolved(self.calib_cfg, self.tokenizer, model)  # auto resolved
        return calib

    def _first_inputs(self, calib: torch.Tensor, resumed: RunState | None, hidden_dir: Path, start: int) -> None:
        """This rank's batches and their inputs of layer ``start`` (captured at layer 0, or saved ones).

        Layer 0's inputs are captured one batch at a time and stored at once, so activations that go to disk
        are never all in memory together.
        """
        device, ctx, plan, model = self.device, self.ctx, self.plan, self.model
        batch_size = self.calib_cfg.batch_size
        self.n_batches = math.ceil(calib.shape[0] / batch_size)
        self.mine = owned_batches(self.n_batches, ctx)
        if resumed is None:
            keys = plan.other_keys + plan.layer_keys[0]
            load_tensors(model, keys, self.src, plan, device)
            compute = compute_dtype_for(self.dtype, device)  # as the in-memory loop: fp32 on the CPU for 16-bit
            emb = model.get_input_embeddings() if compute is not None else None
            if emb is not None:
                emb.to(compute)  # hidden states and rotary tables of layer 0 in the compute dtype
            args, kwargs = [], []
            store = None
            for g in self.mine:
                captured = capture_layer_inputs(model, calib[g * batch_size:(g + 1) * batch_size], device, batch_size)
                t = captured.hidden[0]
                if store is None:
                    rows = sum(min(batch_size, calib.shape[0] - b * batch_size) for b in self.mine)
                    nbytes = rows * t[0].numel() * t.element_size()
                    nbytes = broadcast_object(nbytes, ctx, 0)
                    mode = store_mode(nbytes, device, parse_size(self.opts.max_memory), ram=available_ram())
                    log.info("calibration activations: %.1f MiB on this rank, kept in %s", nbytes / 2**20, mode)
                    store = HiddenStore(mode, device, hidden_dir, {}, t.dtype)
                store.add(0, g, t)
                args.append(captured.args[0])
                kwargs.append(captured.kwargs[0])
                del captured, t
            if store is None:  # a rank without batches still takes part in the broadcast
                mode = store_mode(broadcast_object(0, ctx, 0), device, parse_size(self.opts.max_memory))
                store = HiddenStore(mode, device, hidden_dir)
            if emb is not None:
                emb.to(self.dtype)
            to_meta(model, keys)
            model.tie_weights()
            self.extra = LayerInputs([], args, kwargs)
            cpu = torch.device("cpu")
            torch.save({"args": to_device(args, cpu), "kwargs": to_device(kwargs, cpu)}, self.work.inputs(ctx.rank))
            self.store = store
            return
        shapes = batch_shapes(calib.shape[0], batch_size, self.mine, (calib.shape[1], None))
        self.store = HiddenStore(resumed.store, device, hidden_dir, shapes)
        if start >= len(plan.layer_keys):  # interrupted after the last layer: nothing left to run
            self.extra = LayerInputs()
            return
        saved = _load_saved(self.work.inputs(ctx.rank), "layer inputs", self.work)
        if not (isinstance(saved, dict) and isinstance(saved.get("args"), list) and isinstance(saved.get("kwargs"), list)
                and len(saved["args"]) == len(saved["kwargs"]) == len(self.mine)):
            raise LlmpruneError(f"layer inputs {self.work.inputs(ctx.rank)} do not match the calibration batches; "
                                f"{self.work.hint()}")
        self.extra = LayerInputs([], to_device(saved["args"], device), to_device(saved["kwargs"], device))
        self.store.init(start, None, self.mine)
