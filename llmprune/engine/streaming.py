"""Streaming compress: prune a model larger than device memory, or CPU RAM, one decoder layer at a time.

The model is built on the meta device (``accelerate.init_empty_weights``), so building it costs no memory; its
weights stay in the memory-mapped safetensors files (``safetensors.safe_open``). For each decoder layer the
driver materializes that layer's tensors straight onto the device, runs the calibration batches through it
(statistics hooks, exactly as :func:`llmprune.engine.layerwise.prune_layerwise`), prunes it, re-runs it so the
pruned outputs feed the next layer, writes its tensors into the output shards and returns it to the meta device.
The embeddings/head are materialized only for the capture of layer 0's inputs. Calibration activations of the
current layer are the only other large state: on the device while they fit ``max_memory``, else in CPU RAM (CUDA
runs) or on disk (``offload_dir``, memory-mapped).

Output shards are safetensors files whose headers are planned up front from the model's shapes and dtypes, so
each layer's tensors are written to their final place as soon as the layer is done; the whole state dict is
never in memory. Everything is written under ``<output>.partial/`` (shards, calibration ids, the current layer's
inputs, ``state.json``, committed atomically after each layer) and renamed to ``<output>`` at the end, so an
interrupted run continues with ``resume=True`` (CLI ``--resume``) from the last finished layer and produces the
same checkpoint as an uninterrupted run.

Under ``torchrun`` every rank runs its share of the calibration batches and the statistics are combined with
:mod:`llmprune.calibration.distributed`; rank 0 writes the checkpoint.

When it is used (``low_memory``): ``True`` always (error if impossible), ``False`` never, ``None`` (default)
when the checkpoint is local safetensors whose size exceeds half the available RAM, or when ``resume`` or a
multi-process launch asks for it. Supported: one prune stage of a per-linear method (magnitude, Wanda,
SparseGPT, or any method registered with ``kind="linear"``), the ``dense`` format.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune._version import __version__
from llmprune.calibration.capture import LayerInputs, capture_layer_inputs, run_layer
from llmprune.calibration.stats import feed_hook, make_accumulator
from llmprune.config import CalibConfig, Recipe
from llmprune.engine.layerwise import apply_method
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.checkpoint import METADATA_FILE, check_output, move_into_place
from llmprune.formats.shards import DEFAULT_SHARD_SIZE, ShardWriter
from llmprune.model.access import (
    DEFAULT_IGNORE,
    decoder_layers,
    decoder_layers_path,
    linear_modules,
    matches_any,
)
from llmprune.model.device import to_device
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import ModuleReport

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1

def parse_size(value: str | int | float | None) -> int | None:
    """``"20GiB"``, ``"500MB"``, ``"1e9"``, ``123`` -> bytes (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"invalid size {value!r} (use e.g. 20GiB, 500MB or a number of bytes)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


# --------------------------------------------------------------------------------------------------- source
class SafetensorsSource:
    """The tensors of a safetensors checkpoint directory, read lazily from memory-mapped files."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:  # one file: transformers' name (other *.safetensors beside it, e.g. attention gates, are not ours)
            single = self.directory / "model.safetensors"
            files = [single] if single.is_file() else sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise LlmpruneError(f"no safetensors files in {self.directory}")
            weight_map = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    @staticmethod
    def find(directory: str | os.PathLike) -> Path | None:
        from llmprune.formats.checkpoint import read_metadata

        d = Path(directory)
        if not (d.is_dir() and (d / "config.json").is_file() and any(d.glob("*.safetensors"))):
            return None
        meta = read_metadata(d)
        if meta and meta.get("format", "dense") != "dense":  # packed/structured inputs need their own loader
            return None
        if (d / "attn_gates.safetensors").is_file():  # learned gates are attached by the in-memory loader only
            return None
        return d

    def _handle(self, key: str):
        from safetensors import safe_open

        fname = self.weight_map[key]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.directory / fname, framework="pt")
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in set(self.weight_map.values()))

    def close(self) -> None:
        self._handles.clear()


# --------------------------------------------------------------------------------------------------- activations
class HiddenStore:
    """Hidden states of this rank's calibration batches at the input of the current layer.

    Mode ``device``/``cpu``: kept in memory there. Mode ``disk``: only in the per-layer files (loaded one batch
    at a time). In every mode the states at each layer boundary are also saved as ``L{layer}/b{batch}`` files
    (what ``--resume`` restarts from).
    """

    def __init__(self, mode: str, device: torch.device, directory: Path) -> None:
        self.mode, self.device, self.directory = mode, device, Path(directory)
        self.data: dict[int, torch.Tensor] = {}
        self.layer = 0

    def _file(self, layer: int, g: int) -> Path:
        return self.directory / f"L{layer}" / f"b{g}.safetensors"

    def _save(self, layer: int, g: int, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._file(layer, g)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"hidden": t.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)

    def _load(self, layer: int, g: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._file(layer, g), framework="pt") as f:
            return f.get_tensor("hidden")

    def init(self, layer: int, tensors: dict[int, torch.Tensor] | None, batches: list[int]) -> None:
        """Start at ``layer`` with the given states (None: load them from the layer's files)."""
        self.layer = layer
        for g in batches:
            t = tensors[g] if tensors is not None else None
            if tensors is not None:
                self._save(layer, g, t)
            if self.mode != "disk":
                t = t if t is not None else self._load(layer, g)
                self.data[g] = t.to(self.device if self.mode == "device" else "cpu")

    def get(self, g: int) -> torch.Tensor:
        t = self.data[g] if self.mode != "disk" else self._load(self.layer, g)
        return t.to(self.device)

    def put(self, g: int, t: torch.Tensor) -> None:
        """Output of the current layer for batch ``g`` (= input of the next layer)."""
        self._save(self.layer + 1, g, t)
        if self.mode != "disk":
            self.data[g] = t if self.mode == "device" else t.to("cpu")

    def advance(self) -> None:
        self.layer += 1

    def drop(self, layer: int) -> None:
        shutil.rmtree(self.directory / f"L{layer}", ignore_errors=True)


# --------------------------------------------------------------------------------------------------- tensors
def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(name)


def _to_meta(root: nn.Module, names: list[str]) -> None:
    sd = root.state_dict(keep_vars=True)
    for name in names:
        _set_tensor(root, name, torch.empty_like(sd[name], device="meta"))


@dataclasses.dataclass
class _Plan:
    path: Path
    config: object
    dtype: torch.dtype
    keys: list[str]  # output tensors, in state-dict order (tied duplicates removed)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    layer_keys: list[list[str]]
    other_keys: list[str]
    prefix: str


def _skeleton(path: Path, dtype, trust_remote_code: bool):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.model.loading import parse_dtype

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            src = SafetensorsSource(path)
            floats = [src.get(k).dtype for k in src.keys()[:1]]
            torch_dtype = floats[0] if floats and floats[0].is_floating_point else torch.float32
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.tie_weights()
    return model, config, torch_dtype


def _plan(model, path: Path, torch_dtype, src: SafetensorsSource) -> _Plan | str:
    """Output layout, or the reason the checkpoint cannot be streamed."""
    sd = model.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    keys = []
    for name, t in sd.items():
        if id(t) in seen:  # tied to an earlier tensor (lm_head <- embed_tokens): saved once, like save_pretrained
            continue
        seen[id(t)] = name
        keys.append(name)
    available = set(src.keys())
    missing = [k for k in keys if k not in available]
    if missing:
        return f"checkpoint keys differ from the model's (missing e.g. {missing[0]})"
    for k in keys:
        if src.shape(k) != tuple(sd[k].shape):
            return f"{k}: checkpoint shape {src.shape(k)} != model {tuple(sd[k].shape)}"
    prefix = decoder_layers_path(model)
    n_layers = len(decoder_layers(model))
    layer_keys: list[list[str]] = [[] for _ in range(n_layers)]
    other = []
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    for k in keys:
        m = pat.match(k)
        (layer_keys[int(m.group(1))] if m else other).append(k)
    return _Plan(path, model.config, torch_dtype, keys, {k: tuple(sd[k].shape) for k in keys},
                 {k: sd[k].dtype for k in keys}, layer_keys, other, prefix)


# --------------------------------------------------------------------------------------------------- decision
def local_safetensors(model_ref: str) -> Path | None:
    """The local safetensors directory for a resolved model reference, if any."""
    return SafetensorsSource.find(model_ref)


def hub_safetensors(model_ref: str) -> Path | None:
    """Download (or find in the HF cache) a Hub model's safetensors + config + tokenizer files."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(model_ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                              "*.jinja", "tokenizer*"]))
    except Exception as exc:  # offline, gated, no such repo
        log.info("no safetensors snapshot for %s: %s", model_ref, type(exc).__name__)
        return None
    return SafetensorsSource.find(d)


def unsupported_reason(recipe: Recipe) -> str | None:
    """Why a recipe cannot run through the streaming engine (None: it can)."""
    if len(recipe.stages) != 1:
        return "streaming runs exactly one prune stage (multi-stage recipes need the in-memory path)"
    method = method_for_config(recipe.stages[0])
    if method.kind != "linear":
        return f"method {method.name!r} is a whole-model method"
    if recipe.save.format != "dense":
        return f"format {recipe.save.format!r} needs the whole model in memory"
    return None


def use_streaming(resolved: str, recipe: Recipe, *, low_memory: bool | None, resume: bool) -> Path | None:
    """Decide whether :func:`llmprune.api.compress` streams; returns the safetensors directory if so.

    Raises :class:`ConfigError` when streaming is required (``low_memory=True``, ``resume``, ``torchrun``) but
    impossible.
    """
    from llmprune.calibration.distributed import env_world_size

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


# --------------------------------------------------------------------------------------------------- engine
@dataclasses.dataclass
class StreamOptions:
    """Options of the streaming engine (see :func:`compress_streaming`)."""

    resume: bool = False
    max_memory: str | int | None = None
    offload_dir: str | os.PathLike | None = None
    dist_reduce: str = "exact"
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    stop_after: int | None = None  # testing: raise after this many layers (simulated interruption)


class SimulatedInterruption(RuntimeError):
    pass


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _calibration(plan: _Plan, recipe: Recipe, tokenizer, opts: StreamOptions, trust_remote_code: bool, work: Path):
    from llmprune.calibration.data import load_calibration

    calib_cfg = recipe.calibration
    max_ctx = getattr(plan.config, "max_position_embeddings", None) or calib_cfg.seqlen
    if calib_cfg.seqlen > max_ctx:
        log.warning("seqlen %d exceeds the model context %d; using %d", calib_cfg.seqlen, max_ctx, max_ctx)
        calib_cfg = CalibConfig(**{**calib_cfg.to_dict(), "seqlen": max_ctx})
    model = None
    source = calib_cfg.source
    needs_model = source == "self"
    if source == "auto":
        from llmprune.model.network import hub_reachable

        needs_model = not hub_reachable()
    if needs_model:  # sampling from the model: accelerate big-model inference, offloading what does not fit
        from transformers import AutoModelForCausalLM

        kw = {"dtype": plan.dtype, "device_map": "auto", "offload_folder": str(opts.offload_dir or work / "offload")}
        if opts.max_memory is not None:
            kw["max_memory"] = {"cpu": parse_size(opts.max_memory)}
        model = AutoModelForCausalLM.from_pretrained(plan.path, trust_remote_code=trust_remote_code, **kw).eval()
    calib = load_calibration(calib_cfg, tokenizer, model)
    del model
    return calib, calib_cfg


def _store_mode(nbytes: int, device: torch.device, opts: StreamOptions) -> str:
    budget = parse_size(opts.max_memory)
    if device.type == "cuda":
        if budget is None:
            budget = int(0.3 * torch.cuda.get_device_properties(device).total_memory)
        return "device" if nbytes <= budget else "cpu"
    return "cpu" if budget is None or nbytes <= budget else "disk"


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
):
    """Streaming, resumable, optionally distributed compress of a safetensors checkpoint.

    Same arguments and result as :func:`llmprune.api.compress` (which calls this when it streams) plus
    ``path`` (the safetensors directory) and ``options``. Produces the same tensors as the in-memory path.
    """
    from llmprune.api import CompressResult
    from llmprune.calibration.distributed import REDUCTIONS, setup
    from llmprune.model.loading import load_tokenizer
    from llmprune.prune.report import PruneReport

    opts = options or StreamOptions()
    if opts.dist_reduce not in REDUCTIONS:
        raise ConfigError(f"dist_reduce must be one of {', '.join(REDUCTIONS)}, got {opts.dist_reduce!r}")
    reason = unsupported_reason(recipe)
    if reason:
        raise ConfigError(reason)
    output = check_output(output, overwrite)
    ctx, device = setup(device)
    try:
        return _run(model_ref, Path(path), recipe, output, device, dtype, overwrite, progress, trust_remote_code,
                    command, opts, ctx, CompressResult, PruneReport, load_tokenizer)
    finally:
        ctx.close()


def _run(model_ref, path, recipe, output, device, dtype, overwrite, progress, trust_remote_code, command, opts,
         ctx, CompressResult, PruneReport, load_tokenizer):
    from llmprune.calibration.distributed import broadcast_object, broadcast_tensor, owned_batches

    t_start = time.perf_counter()
    stage = recipe.stages[0]
    method = method_for_config(stage)
    patterns = DEFAULT_IGNORE + tuple(stage.ignore)
    src = SafetensorsSource(path)
    model, config, torch_dtype = _skeleton(path, dtype, trust_remote_code)
    plan = _plan(model, path, torch_dtype, src)
    if isinstance(plan, str):
        raise ConfigError(f"cannot stream {path}: {plan}")
    tokenizer = load_tokenizer(str(path), trust_remote_code)
    work = output.with_name(output.name + ".partial")
    ckpt = work / "ckpt"
    shard_size = parse_size(opts.max_shard_size)
    fingerprint = hashlib.sha256(json.dumps({
        "v": STATE_VERSION, "llmprune": __version__, "model": str(path.resolve()), "recipe": recipe.to_dict(),
        "dtype": str(torch_dtype), "world": ctx.world, "reduce": opts.dist_reduce, "shard": shard_size,
    }, sort_keys=True, default=str).encode()).hexdigest()

    # ---- resume or start afresh (rank 0 decides, everyone follows)
    state, error = None, None
    if ctx.is_main:
        if (work / STATE_FILE).is_file():
            old = json.loads((work / STATE_FILE).read_text())
            if not opts.resume:
                error = f"an interrupted run left {work}; pass --resume to continue it (or delete it)"
            elif old.get("fingerprint") != fingerprint:
                error = f"{work} belongs to a different run (model, recipe, dtype or world size changed)"
            else:
                state = old
                log.info("resuming at layer %d of %d", state["next_layer"], len(plan.layer_keys))
        else:
            if opts.resume:
                log.warning("--resume: no interrupted run at %s; starting from the beginning", work)
            shutil.rmtree(work, ignore_errors=True)
            ckpt.mkdir(parents=True)
    state, error = broadcast_object((state, error), ctx)
    if error:
        raise LlmpruneError(error)
    work.mkdir(parents=True, exist_ok=True)  # other nodes of a multi-node run without a shared filesystem
    ctx.barrier()
    hidden_dir = (Path(opts.offload_dir) / f"{output.name}.hidden") if opts.offload_dir else work / "hidden"
    if state is not None:
        hidden_dir = Path(state["hidden_dir"])

    # ---- calibration ids (rank 0 computes, then broadcast; saved for --resume)
    calib_file = work / "calib.pt"
    if state is not None:
        calib = torch.load(calib_file, weights_only=True) if ctx.is_main else None
        calib_cfg = CalibConfig(**state["calibration"])
    elif ctx.is_main:
        calib, calib_cfg = (None, recipe.calibration)
        if method.needs_calibration:
            t_cal = time.perf_counter()
            calib, calib_cfg = _calibration(plan, recipe, tokenizer, opts, trust_remote_code, work)
            log.info("calibration data: %s in %.1fs", tuple(calib.shape), time.perf_counter() - t_cal)
            torch.save(calib, calib_file)
    else:
        calib, calib_cfg = None, None
    calib_cfg = broadcast_object(calib_cfg, ctx)
    has_calib = broadcast_object(calib is not None, ctx)
    if has_calib and ctx.enabled:
        calib = broadcast_tensor(calib.to(device) if ctx.is_main else None, ctx, device).cpu()
    batch_size = calib_cfg.batch_size
    n_batches = math.ceil(calib.shape[0] / batch_size) if has_calib else 0
    mine = owned_batches(n_batches, ctx)

    # ---- output shards (rank 0)
    writer = None
    if ctx.is_main:
        writer = ShardWriter(ckpt, [(k, plan.dtypes[k], plan.shapes[k]) for k in plan.keys], shard_size,
                             reopen=state is not None)
        if state is None:
            for k in plan.other_keys:  # embeddings, final norm, head: unchanged, copied from the source
                writer.write(k, src.get(k).to(plan.dtypes[k]))
            writer.flush()
        src.close()

    layers = decoder_layers(model)
    n_layers = len(layers)
    inputs_file = work / f"inputs-rank{ctx.rank}.pt"
    start = 0 if state is None else int(state["next_layer"])
    reports = [ModuleReport(**{**r, "shape": tuple(r["shape"])}) for r in state["reports"]] if state else []
    seconds_before = float(state["seconds"]) if state else 0.0
    extra: LayerInputs | None = None
    store = None
    if has_calib:
        if state is None:
            _load_tensors(model, plan.other_keys + plan.layer_keys[0], src, plan, "cpu")
            local_ids = torch.cat([calib[g * batch_size:(g + 1) * batch_size] for g in mine]) if mine else None
            captured = capture_layer_inputs(model, local_ids, device, batch_size) if mine else LayerInputs()
            _to_meta(model, plan.other_keys + plan.layer_keys[0])
            model.tie_weights()
            extra = LayerInputs([], captured.args, captured.kwargs)
            torch.save({"args": to_device(captured.args, torch.device("cpu")),
                        "kwargs": to_device(captured.kwargs, torch.device("cpu"))}, inputs_file)
            hidden = dict(zip(mine, captured.hidden))
            del captured
        else:
            saved = torch.load(inputs_file, weights_only=True)
            extra = LayerInputs([], to_device(saved["args"], device), to_device(saved["kwargs"], device))
            hidden = None
        nbytes = sum(t.numel() * t.element_size() for t in hidden.values()) if hidden else 0
        nbytes = broadcast_object(nbytes, ctx, 0) if state is None else 0
        mode = state["store"] if state is not None else _store_mode(nbytes, device, opts)
        store = HiddenStore(mode, device, hidden_dir)
        store.init(start, hidden, mine)
        del hidden

    def commit(next_layer: int, seconds: float) -> None:
        ctx.barrier()  # every rank has saved its inputs of next_layer
        if ctx.is_main:
            _atomic_json(work / STATE_FILE, {
                "version": STATE_VERSION, "fingerprint": fingerprint, "next_layer": next_layer,
                "n_layers": n_layers, "reports": [dataclasses.asdict(r) for r in reports], "seconds": seconds,
                "calibration": calib_cfg.to_dict(), "store": store.mode if store else None,
                "hidden_dir": str(hidden_dir),
            })
        ctx.barrier()

    if state is None:
        commit(0, 0.0)
    t_run = time.perf_counter()
    bar = tqdm(range(start, n_layers), desc=f"{method.name} {stage.sparsity}", unit="layer",
               disable=not progress or not ctx.is_main, initial=start, total=n_layers)
    for idx in bar:
        if opts.stop_after is not None and idx - start >= opts.stop_after:
            raise SimulatedInterruption(f"stopped before layer {idx}")
        layer = layers[idx]
        keys = plan.layer_keys[idx]
        _load_tensors(model, keys, src, plan, device)
        src.close()  # unmap: pages of finished layers leave the process's RSS
        _move_buffers(layer, device)  # non-persistent buffers (rotary tables of some architectures)
        reports.extend(_prune_layer(layer, idx, plan.prefix, method, stage, extra, store, mine, n_batches, ctx,
                                    opts.dist_reduce, device, lambda n: matches_any(n, patterns)))
        if store is not None and idx + 1 < n_layers:
            for g in mine:
                batch = LayerInputs([store.get(g)], [extra.args[mine.index(g)]], [extra.kwargs[mine.index(g)]])
                store.put(g, run_layer(layer, batch, 0))
        if writer is not None:
            sd = model.state_dict(keep_vars=True)
            for k in keys:
                writer.write(k, sd[k].detach())
            writer.flush()
        _to_meta(model, keys)
        _move_buffers(layer, torch.device("cpu"))
        _release_freed_memory()
        if store is not None and idx + 1 < n_layers:
            store.advance()
        commit(idx + 1, seconds_before + time.perf_counter() - t_run)
        if store is not None and idx + 1 < n_layers:
            store.drop(idx)
    report = PruneReport(reports, seconds_before + time.perf_counter() - t_run)

    metadata = {
        "llmprune_version": __version__,
        "base_model": str(model_ref) if model_ref else "smollm2-135m",
        "recipe": recipe.to_dict(),
        "calibration": calib_cfg.to_dict() if has_calib else None,
        "sparsity": {
            "overall": round(report.overall_sparsity, 6),
            "modules": {m.name: round(m.sparsity, 6) for m in report.modules},
        },
        "prune_seconds": round(report.seconds, 2),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "command": command or " ".join(sys.argv),
        "format": recipe.save.format,
        "engine": {"streaming": True, "world_size": ctx.world,
                   "dist_reduce": opts.dist_reduce if ctx.enabled else None},
    }
    if ctx.is_main:
        writer.finish()
        _finalize(model, path, tokenizer, ckpt, work, output, metadata, overwrite, hidden_dir)
        log.info("streamed checkpoint to %s in %.1fs", output, time.perf_counter() - t_start)
    ctx.barrier()
    src.close()
    return CompressResult(output, report, metadata)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS after each layer (glibc keeps it otherwise, so the resident size
    would creep up with depth through fragmentation although nothing is live)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for name, b in module.named_buffers():
        if b.device.type != "meta" and b.device != device:
            _set_tensor(module, name, b.to(device))


def _load_tensors(model: nn.Module, keys: list[str], src: SafetensorsSource, plan: _Plan, device) -> None:
    for k in keys:
        # copy=True: safetensors may hand out tensors backed by its private file mapping; pruning them in place
        # would turn the mapped pages into anonymous copy-on-write memory that lives as long as the mapping.
        _set_tensor(model, k, src.get(k).to(device=device, dtype=plan.dtypes[k], copy=True))
    if any(k in plan.other_keys for k in keys):
        model.tie_weights()


def _finalize(model, path: Path, tokenizer, ckpt: Path, work: Path, output: Path, metadata: dict, overwrite: bool,
              hidden_dir: Path | None = None):
    from transformers import GenerationConfig

    model.config.use_cache = True
    model.config.save_pretrained(ckpt)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        gen = GenerationConfig.from_model_config(model.config) if model.can_generate() else None
    if gen is not None:
        gen.save_pretrained(ckpt)
    if tokenizer is not None:
        tokenizer.save_pretrained(ckpt)
    (ckpt / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and not overwrite:
        raise LlmpruneError(f"output {output} already exists (pass --overwrite to replace it)")
    move_into_place(ckpt, output)
    shutil.rmtree(work, ignore_errors=True)
    if hidden_dir is not None:
        shutil.rmtree(hidden_dir, ignore_errors=True)


@torch.no_grad()
def _prune_layer(layer, idx, prefix, method, config, extra, store, mine, n_batches, ctx, reduce_mode, device,
                 ignore) -> list[ModuleReport]:
    """One layer of :func:`llmprune.engine.layerwise.prune_layerwise`, with this rank's share of the batches."""
    from llmprune.calibration.distributed import allreduce_stats, exchange_round

    targets = {name: mod for name, mod in linear_modules(layer).items() if not ignore(f"{prefix}.{idx}.{name}")}
    stats: dict[str, dict] = {}
    t0 = time.perf_counter()
    if method.stats:
        stats = {n: {s: make_accumulator(s, m, device) for s in method.stats} for n, m in targets.items()}
        exact = ctx.enabled and reduce_mode == "exact"
        feed = {name: ({} if exact else stats[name]) for name in targets}
        handles = [mod.register_forward_hook(feed_hook(feed[name])) for name, mod in targets.items()]
        try:
            for k in range(math.ceil(n_batches / ctx.world)):
                g = k * ctx.world + ctx.rank
                pending = None
                if exact:
                    pending = {n: {s: make_accumulator(s, m, device) for s in method.stats} for n, m in targets.items()}
                    for name in targets:
                        feed[name].clear()
                        feed[name].update(pending[name])
                if g < n_batches:
                    j = mine.index(g)
                    run_layer(layer, LayerInputs([store.get(g)], [extra.args[j]], [extra.kwargs[j]]), 0)
                if exact:
                    batches = [b for b in range(k * ctx.world, (k + 1) * ctx.world) if b < n_batches]
                    exchange_round(stats, pending if g < n_batches else None, batches, ctx, device)
        finally:
            for h in handles:
                h.remove()
        if ctx.enabled and reduce_mode == "sum":
            allreduce_stats(stats, ctx)
    return apply_method(method, config, targets, stats, prefix, idx, time.perf_counter() - t0)
