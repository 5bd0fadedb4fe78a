"""The ``"packed"`` checkpoint format: 2:4 linears stored as ``values`` + ``meta`` in a Hugging Face folder.

A ``"packed"`` checkpoint is a Hugging Face folder whose safetensors hold, for every packed linear ``NAME``,
``NAME.values``, ``NAME.meta`` (and ``NAME.bias`` when present) instead of ``NAME.weight`` (byte layout:
:mod:`llmprune.formats.sparse24`); all other tensors (embeddings, ``lm_head``, norms, linears left dense) are
stored as usual. ``config.json`` carries
``quantization_config = {"quant_method": "llmprune_sparse24", "format_version": 1, "modules": [...]}``
listing the packed linears. :func:`load_packed` (used by ``llmprune.load(DIR)``) builds the model on the meta
device, swaps the listed linears for :class:`~llmprune.runtime.sparse24.module.Sparse24Linear` and fills every
tensor straight from the safetensors files, so the dense model never exists in memory.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.shards import DEFAULT_SHARD_SIZE, plan_shards, shard_name, write_index
from llmprune.formats.sparse24 import FORMAT_VERSION, PACKABLE_PATTERNS, QUANT_METHOD, pack_24
from llmprune.prune.registry import method_for_config
from llmprune.runtime.sparse24.module import _empty_sparse_modules, packable_linears

log = logging.getLogger(__name__)


def check_recipe(recipe) -> None:
    """Cheap pre-check run before any work: every prune stage must produce a 2:4-compatible pattern.

    Raises:
        ConfigError: naming the first stage whose sparsity the packed layout cannot store.
    """
    for i, stage in enumerate(recipe.stages):
        pat = stage.sparsity
        if str(pat) not in PACKABLE_PATTERNS:
            where = f" (stage {i + 1}, {method_for_config(stage).name})" if len(recipe.stages) > 1 else ""
            raise ConfigError(
                f"format 'packed' stores 2:4 sparsity, but sparsity {pat}{where} is not 2:4 "
                "(use --sparsity 2:4, or --format dense)"
            )


def quant_config(names: list[str]) -> dict:
    """The ``quantization_config`` dict written to ``config.json`` for the packed linears ``names``."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": names}


def _packed_state(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The model's state dict with every target ``nn.Linear`` weight replaced by its ``values`` + ``meta``."""
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        mod_name, _, attr = key.rpartition(".")
        mod = targets.get(mod_name)
        if mod is not None and isinstance(mod, nn.Linear) and attr == "weight":
            try:
                values, meta = pack_24(t.detach())
            except ValueError as exc:
                raise LlmpruneError(f"{mod_name}: {exc}") from None
            tensors[f"{mod_name}.values"], tensors[f"{mod_name}.meta"] = values, meta
        else:
            tensors[key] = t.detach()
    # safetensors refuses shared storage: keep the first of tied tensors (re-tied at load).
    seen: dict[tuple, str] = {}
    for key in list(tensors):
        t = tensors[key]
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            del tensors[key]
        else:
            seen[ident] = key
    return tensors


def save_packed(model: nn.Module, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_SIZE) -> None:
    """Save ``model`` with its 2:4 linears packed (the ``"packed"`` format's saver).

    Raises:
        LlmpruneError: if the decoder layers hold no 2:4 linear, or a linear listed as packable is not 2:4.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    targets = packable_linears(model)
    if not targets:
        raise LlmpruneError(
            "format 'packed': no 2:4-sparse linear found in the decoder layers; prune with --sparsity 2:4 first"
        )
    names = sorted(targets)
    tensors = _packed_state(model, targets)
    keys = list(tensors)
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    groups = plan_shards(sizes, max_shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = shard_name(i, len(groups))
        save_file({keys[j]: tensors[keys[j]].contiguous().cpu() for j in group}, str(directory / fname),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((keys[j] for j in group), fname))
    if len(groups) > 1:
        write_index(directory, weight_map, sum(sizes))
    config = copy.deepcopy(model.config)
    config.quantization_config = quant_config(names)
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(directory)
    log.info("packed %d linears (2:4) into %s", len(names), directory)


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise LlmpruneError(f"{directory}: no model.safetensors (or index) found")


def _packed_modules(directory: Path, config) -> list[str]:
    """The packed linears listed by ``config``'s ``quantization_config`` (removed from ``config``)."""
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict):
        qc = qc.to_dict() if qc is not None else {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise LlmpruneError(f"{directory} is not a packed 2:4 checkpoint (no {QUANT_METHOD} quantization_config)")
    if int(qc.get("format_version", 1)) > FORMAT_VERSION:
        raise LlmpruneError(
            f"{directory}: packed format version {qc['format_version']} is newer than this llmprune supports"
        )
    del config.quantization_config
    return list(qc.get("modules", []))


def _fill_from_shards(model: nn.Module, directory: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Read every tensor of the checkpoint straight into the (meta) model's parameters and buffers."""
    from safetensors import safe_open

    dev_str = "cpu" if device.type == "cpu" else str(device if device.index is not None else f"{device.type}:0")
    for path in _shard_files(directory):
        with safe_open(str(path), framework="pt", device=dev_str) as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point():
                    t = t.to(dtype)
                mod_name, _, attr = key.rpartition(".")
                try:
                    mod = model.get_submodule(mod_name)
                except AttributeError:
                    raise LlmpruneError(f"{path.name}: tensor {key!r} matches no module of the model") from None
                if attr in mod._parameters:
                    old = mod._parameters[attr]
                    if old is not None and tuple(old.shape) != tuple(t.shape):
                        raise LlmpruneError(f"{key}: checkpoint shape {tuple(t.shape)} != model {tuple(old.shape)}")
                    mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                elif attr in mod._buffers:
                    mod._buffers[attr] = t
                else:
                    raise LlmpruneError(f"{path.name}: unexpected tensor {key!r}")


def load_packed(directory: str | os.PathLike, dtype="auto", device=None, **_):
    """Load a ``"packed"`` checkpoint into a model whose packed linears are ``Sparse24Linear``.

    The model skeleton is built on the meta device; each tensor is read from the safetensors files directly
    onto ``device`` (default CPU) and cast to ``dtype`` (``"auto"``: the checkpoint's), so no dense copy of
    the packed weights is ever made.

    Raises:
        LlmpruneError: if the folder is not a packed checkpoint of a supported version, or its tensors do not
            match the model.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    names = _packed_modules(directory, config)
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _empty_sparse_modules(model, names, dtype)
    _fill_from_shards(model, directory, dtype, device)
    if getattr(config, "tie_word_embeddings", False) or hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise LlmpruneError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.to(device)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    return model
