"""``compress --dry-run``: what a compress run would do, and roughly what it would cost, without pruning.

:func:`plan_compress` runs the same checks as :func:`llmprune.api.compress` before loading (flags, the output,
the calibration file, the stages against the model built on the meta device) and reports the resolved model,
the calibration source (``auto`` resolved to ``c4`` or ``self`` as the run would), the recipe, the output, the
in-memory vs streaming decision, and estimates:

* **memory**: the weights in the run dtype, the calibration activations (``nsamples x seqlen x hidden``, as
  :mod:`llmprune.engine.activations` sizes them, twice: a layer's inputs and outputs) and the largest per-layer
  statistics of the methods (SparseGPT's Hessian ``in x in`` fp32 per linear, Wanda's ``in`` norms);
* **time**: a lower bound, the floating-point work of the calibration passes (every layer runs each batch twice:
  statistics, then the pruned re-run; ``2 x params`` FLOPs per token and pass) plus, for ``self`` calibration,
  the tokens sampled from the model, divided by a matmul throughput measured here in a fraction of a second.
  Real runs are slower (attention, memory traffic, Python overhead); the number says which order of magnitude.

Nothing is written and no weight is read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llmprune.calibration.data import check_calib_source, hub_offline
from llmprune.config import Recipe
from llmprune.engine.preflight import meta_model, preflight, recipe_needs_calibration
from llmprune.engine.streaming import use_streaming
from llmprune.engine.workdir import finished_output
from llmprune.formats.checkpoint import check_output, get_format
from llmprune.formats.safetensors_io import checkpoint_tensors
from llmprune.model.access import decoder_layers, linear_modules
from llmprune.model.device import resolve_device
from llmprune.model.loading import parse_dtype, resolve_model
from llmprune.prune.registry import method_for_config

__all__ = ["matmul_flops_per_second", "plan_compress"]

_STAT_BYTES = {"hessian": lambda n_in: 4 * n_in * n_in, "act_sq_norm": lambda n_in: 4 * n_in}


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 512) -> float:
    """Measured FLOP/s of an ``n x n`` matmul on ``device`` (best of 5, after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / max(best, 1e-9)


def _run_dtype(dtype: str, config) -> torch.dtype:
    d = parse_dtype(dtype)
    if isinstance(d, torch.dtype):
        return d
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def plan_compress(model_ref: str | None, recipe: Recipe, output: str | Path, *, device=None, dtype: str = "auto",
                  overwrite: bool = False, low_memory: bool | None = None, resume: bool = False,
                  trust_remote_code: bool = False, measure: bool = True) -> dict[str, Any]:
    """The plan of ``compress(model_ref, recipe, output, ...)`` (see the module docstring); nothing is pruned.

    Raises:
        LlmpruneError: whatever the real run would refuse before loading the model.
    """
    needs_calib = recipe_needs_calibration(recipe)
    if needs_calib:
        check_calib_source(recipe.calibration)
    fmt = get_format(recipe.save.format)
    if fmt.check is not None:
        fmt.check(recipe)
    dev = resolve_device(device)
    parse_dtype(dtype)
    resolved = resolve_model(model_ref)
    out = Path(output).expanduser()
    if not (resume and finished_output(out)):
        check_output(out, overwrite, inputs=[resolved, recipe.calibration.source])
    stream_dir = use_streaming(resolved, recipe, low_memory=low_memory, resume=resume)
    preflight(resolved, recipe, dtype=dtype, device=dev, trust_remote_code=trust_remote_code,
              streaming=stream_dir is not None)
    source = recipe.calibration.source
    if needs_calib and source == "auto":
        source = "self" if hub_offline() else "c4"
    plan: dict[str, Any] = {
        "model": model_ref, "resolved_model": resolved, "output": str(out), "overwrite": overwrite,
        "device": str(dev), "dtype": dtype, "recipe": recipe.to_dict(),
        "calibration_source": (f"{recipe.calibration.source} -> {source}" if source != recipe.calibration.source
                               else source) if needs_calib else None,
        "engine": "streaming" if stream_dir is not None else "in-memory",
        "format": recipe.save.format,
    }
    model = meta_model(resolved, trust_remote_code)
    if model is None:
        plan["estimate"] = None
        return plan
    config = model.config
    run_dtype = _run_dtype(dtype, config)
    tensors = checkpoint_tensors(resolved) if Path(resolved).is_dir() else None
    n_params = sum(p.numel() for p in model.parameters())
    elt = torch.empty((), dtype=run_dtype).element_size()
    cal = recipe.calibration
    seqlen = min(cal.seqlen, getattr(config, "max_position_embeddings", None) or cal.seqlen)
    hidden = getattr(config, "hidden_size", None) or 0
    compute_elt = 4 if dev.type == "cpu" and elt == 2 else elt  # layers computed in fp32 on the CPU
    acts = 2 * cal.nsamples * seqlen * hidden * compute_elt if needs_calib else 0
    stats = 0
    layers = decoder_layers(model)
    for stage in recipe.stages:
        for name in method_for_config(stage).stats:
            per = _STAT_BYTES.get(name)
            if per is not None and layers:
                stats = max(stats, sum(per(lin.in_features) for lin in linear_modules(layers[0]).values()))
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    tokens = cal.nsamples * seqlen if needs_calib else 0
    flops = 2 * 2 * layer_params * len(layers) * tokens * len(recipe.stages)
    if source == "self" and needs_calib:
        flops += 2 * n_params * tokens  # sampling the calibration text from the model
    rate = matmul_flops_per_second(dev) if measure else None
    plan["estimate"] = {
        "parameters": n_params,
        "layers": len(layers),
        "checkpoint_weight_bytes": sum(_numel(i.shape) * _ELT.get(i.dtype, 4) for i in tensors.values())
        if tensors else None,
        "weights_bytes": n_params * elt,
        "activation_bytes": acts,
        "statistics_bytes": stats,
        "peak_memory_bytes": (n_params * elt if stream_dir is None else layer_params * elt) + acts + stats,
        "calibration_tokens": tokens,
        "calibration_seqlen": seqlen if needs_calib else None,
        "forward_flops": flops,
        "measured_matmul_flops_per_s": rate,
        "time_lower_bound_s": round(flops / rate, 1) if rate else None,
    }
    return plan


_ELT = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "I16": 2, "BOOL": 1}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
