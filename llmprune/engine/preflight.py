"""Checks that run before any weight is read or any calibration starts, from the model's config alone.

``compress`` calls :func:`preflight` right after resolving the model: the prune stages against the linear
shapes (``--ignore`` patterns that match nothing, N:M patterns that do not divide an input dimension) on a
meta-device copy of the model, and the calibration activations the run implies against the memory budget.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from llmprune.config import Recipe
from llmprune.engine.activations import check_activation_memory
from llmprune.engine.step import check_finite, check_stages
from llmprune.formats.checkpoint import read_metadata
from llmprune.model.access import (
    decoder_layers,
    decoder_layers_path,
    hidden_size,
    linear_modules,
    matches_any,
)
from llmprune.model.loading import parse_dtype
from llmprune.prune.registry import method_for_config

log = logging.getLogger(__name__)


def recipe_needs_calibration(recipe: Recipe) -> bool:
    """True when a stage's method or the recovery stage reads calibration text (the data is loaded at all)."""
    return any(method_for_config(s).needs_calibration for s in recipe.stages) or recipe.recover is not None


def check_model_finite(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Before a whole-model method: no linear of the decoder layers it may prune holds NaN/inf."""
    prefix = decoder_layers_path(model)
    for idx, layer in enumerate(decoder_layers(model)):
        targets = {n: m for n, m in linear_modules(layer).items() if not matches_any(f"{prefix}.{idx}.{n}", patterns)}
        check_finite(targets, lambda n, i=idx: f"{prefix}.{i}.{n}")


def meta_model(resolved: str, trust_remote_code: bool) -> nn.Module | None:
    """The model of ``resolved`` on the meta device, built from its config alone (no weights are read), or None
    when that is not possible without loading (a non-dense llmprune checkpoint, an unknown config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = read_metadata(resolved) if Path(resolved).is_dir() else None
    if meta and meta.get("format", "dense") != "dense":  # packed / structured: shapes differ from the config's
        return None
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline Hub id, custom architecture...: the real load reports it
        log.debug("no meta-device model of %s before loading: %s", resolved, exc)
        return None


def preflight(resolved: str, recipe: Recipe, *, dtype: str, device: torch.device, trust_remote_code: bool,
               streaming: bool) -> None:
    """What can be checked from the model's config before any weight is read: the stages against the linear
    shapes (--ignore patterns, N:M), and (in memory) the calibration activations against the RAM."""
    model = meta_model(resolved, trust_remote_code)
    if model is None:
        return
    check_stages(model, recipe.stages)
    if streaming or not any(method_for_config(s).needs_calibration for s in recipe.stages):
        return  # the streaming engine checks its activations itself (they may go to disk)
    config = model.config
    hidden = hidden_size(config)
    if hidden is None:
        return
    torch_dtype = parse_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            torch_dtype = torch.float32
    cal = recipe.calibration
    seqlen = min(cal.seqlen, getattr(config, "max_position_embeddings", None) or cal.seqlen)
    weights = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=torch_dtype).element_size()
    check_activation_memory(cal.nsamples, seqlen, hidden, torch_dtype, device=device, streaming=False,
                            reserved=weights if device.type == "cpu" else 0)
