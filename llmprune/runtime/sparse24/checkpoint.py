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
from llmprune.formats.reading import index_weight_map, preview
from llmprune.formats.safetensors_io import SAFETENSORS_INDEX, dtype_compatible, is_finite, open_safetensors
from llmprune.formats.shards import DEFAULT_SHARD_SIZE, save_shards
from llmprune.formats.sparse24 import (
    FORMAT_VERSION,
    PACKABLE_PATTERNS,
    QUANT_METHOD,
    pack_24,
    validate_packed,
)
from llmprune.model.loading import load_config
from llmprune.model.structured import needs_llmprune_config
from llmprune.prune.registry import method_for_config
from llmprune.runtime.sparse24.module import _empty_sparse_modules, packable_linears

log = logging.getLogger(__name__)

_ST_DTYPE = {torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


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
    directory = Path(directory)
    targets = packable_linears(model)
    if not targets:
        raise LlmpruneError(
            "format 'packed': no 2:4-sparse linear found in the decoder layers; prune with --sparsity 2:4 first"
        )
    names = sorted(targets)
    tensors = _packed_state(model, targets)
    save_shards(tensors, directory, max_shard_bytes)  # huggingface_hub's shards + index, as save_pretrained
    config = copy.deepcopy(model.config)
    config.quantization_config = quant_config(names)
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)
    # A model type plain transformers cannot resolve: without llmprune the packed linears would load at random.
    cfg_file = directory / "config.json"
    cfg_file.write_text(json.dumps(needs_llmprune_config(json.loads(cfg_file.read_text())), indent=2,
                                   sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(directory)
    log.info("packed %d linears (2:4) into %s", len(names), directory)


def _shard_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files (the index's shards, each checked to stay inside ``directory``)."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return sorted(set(index_weight_map(index).values()))
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise LlmpruneError(f"{directory}: no model.safetensors (or index) found")


def _packed_modules(directory: Path, config) -> list[str]:
    """The packed linears listed by ``config``'s ``quantization_config`` (removed from ``config``).

    Raises:
        LlmpruneError: when it is not an ``llmprune_sparse24`` config, its ``format_version`` is not a positive
            integer this llmprune reads, or ``modules`` is not a list of distinct module names.
    """
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict):
        qc = qc.to_dict() if qc is not None else {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise LlmpruneError(f"{directory} is not a packed 2:4 checkpoint (no {QUANT_METHOD} quantization_config)")
    try:
        names = check_quant_config(qc)
    except ValueError as exc:
        raise LlmpruneError(f"{directory / 'config.json'}: {exc}") from None
    del config.quantization_config  # put back on the built model (load_packed), so save_pretrained round-trips
    return names


def check_quant_config(qc: dict) -> list[str]:
    """Validate a packed ``quantization_config`` dict; returns its ``modules``.

    Raises:
        ValueError: for a ``format_version`` that is not a positive int (or newer than :data:`FORMAT_VERSION`),
            or ``modules`` that is not a non-empty list of distinct, non-empty strings.
    """
    version = qc.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(f"quantization_config format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"packed format version {version} is newer than this llmprune supports ({FORMAT_VERSION}); upgrade llmprune"
        )
    modules = qc.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"quantization_config modules must be a non-empty list of module names, got {modules!r}")
    dup = sorted({m for m in modules if modules.count(m) > 1})
    if dup:
        raise ValueError(f"quantization_config modules lists {dup[0]!r} twice")
    return list(modules)


def check_packed_modules(model: nn.Module, names: list[str], where: str | os.PathLike) -> None:
    """Validate every packed linear ``names`` of a loaded model (:func:`~llmprune.formats.sparse24.validate_packed`:
    shapes, dtypes, strictly increasing positions), so a corrupt checkpoint fails at load, not at a forward.

    Raises:
        LlmpruneError: naming the module and what is wrong.
    """
    for name in names:
        mod = model.get_submodule(name)
        try:
            validate_packed(mod.values, mod.meta, mod.in_features)
        except ValueError as exc:
            raise LlmpruneError(f"{where}: packed module {name!r} is corrupt: {exc}") from None


def _fill_from_shards(model: nn.Module, directory: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Read every tensor of the checkpoint straight into the (meta) model's parameters and buffers.

    Each tensor must match the skeleton's shape and dtype kind (a float stays float, ``meta`` stays ``int32``)
    and hold no NaN/inf; a tensor stored twice is refused.
    """
    dev_str = "cpu" if device.type == "cpu" else str(device if device.index is not None else f"{device.type}:0")
    seen: set[str] = set()
    for path in _shard_files(directory):
        if not path.is_file():
            raise LlmpruneError(f"{directory}: shard {path.name} listed in the index is missing")
        with open_safetensors(path, device=dev_str) as f:
            for key in f.keys():
                if key in seen:
                    raise LlmpruneError(f"{path}: tensor {key!r} is stored twice")
                seen.add(key)
                mod_name, _, attr = key.rpartition(".")
                try:
                    mod = model.get_submodule(mod_name)
                except AttributeError:
                    raise LlmpruneError(f"{path.name}: tensor {key!r} matches no module of the model") from None
                if attr in mod._parameters:
                    old = mod._parameters[attr]
                elif attr in mod._buffers:
                    old = mod._buffers[attr]
                else:
                    raise LlmpruneError(f"{path.name}: unexpected tensor {key!r}")
                info = f.info(key)
                if old is not None:
                    if info.shape != tuple(old.shape):
                        raise LlmpruneError(
                            f"{path}: tensor {key!r} has shape {info.shape}, the model's is {tuple(old.shape)}"
                        )
                    if not dtype_compatible(info.dtype, old.dtype) or (
                        not old.is_floating_point() and info.dtype != _ST_DTYPE.get(old.dtype)
                    ):
                        raise LlmpruneError(
                            f"{path}: tensor {key!r} is stored as {info.dtype}, the model's is "
                            f"{str(old.dtype).removeprefix('torch.')}"
                        )
                t = f.get(key)
                if not is_finite(t):
                    raise LlmpruneError(f"{path}: tensor {key!r} holds NaN or infinite values")
                if t.is_floating_point():
                    t = t.to(dtype)
                if attr in mod._parameters:
                    mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                else:
                    mod._buffers[attr] = t


def load_packed(directory: str | os.PathLike, dtype="auto", device=None, **_):
    """Load a ``"packed"`` checkpoint into a model whose packed linears are ``Sparse24Linear``.

    The model skeleton is built on the meta device; each tensor is read from the safetensors files directly
    onto ``device`` (default CPU) and cast to ``dtype`` (``"auto"``: the checkpoint's), so no dense copy of
    the packed weights is ever made.

    Every tensor is checked as it is read (shape, dtype kind, finite values) and every packed linear before
    the model is returned (:func:`check_packed_modules`).

    Raises:
        LlmpruneError: if the folder is not a packed checkpoint of a supported version, or its tensors do not
            match the model or are corrupt (naming the file, tensor or module).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    config = load_config(directory)
    names = _packed_modules(directory, config)
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        _empty_sparse_modules(model, names, dtype)
    except LlmpruneError as exc:
        raise LlmpruneError(f"{directory / 'config.json'}: {exc}") from None
    _fill_from_shards(model, directory, dtype, device)
    if getattr(config, "tie_word_embeddings", False) or hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise LlmpruneError(f"{directory}: checkpoint lacks {preview(missing)}")
    check_packed_modules(model, names, directory)
    model.config.quantization_config = quant_config(names)  # model.save_pretrained(DIR) writes a packed checkpoint
    model.to(device)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    return model
