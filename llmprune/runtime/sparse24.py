"""Packed 2:4 weights: the on-disk/in-memory format, ``Sparse24Linear`` and the ``"packed"`` checkpoint format.

Layout (format version 1), for a 2:4-sparse linear weight ``W`` of shape ``[out, in]`` (``in`` a multiple of 4):

* Columns are cut into groups of 4 (``in / 4`` groups per row). Each group keeps at most 2 non-zeros.
* ``values``: ``[out, in / 2]`` in the weight's dtype. Kept value ``j`` of a row belongs to group ``j // 2``
  (slot ``j % 2``); the two values of a group are stored in increasing column order. A group with fewer than
  two non-zeros stores explicit zeros (its free slots take the lowest unused positions).
* ``meta``: ``[out, ceil(in / 32)]`` ``int32``. Kept value ``j`` has a 2-bit position ``p`` (0..3) inside its
  group, stored at bits ``2 * (j % 16)`` .. ``2 * (j % 16) + 1`` of word ``meta[row, j // 16]`` (least
  significant bits first; one word = 16 kept values = 8 groups = 32 input columns; unused high bits of the
  last word are 0). The input column of value ``j`` is ``4 * (j // 2) + p``. Words are stored as signed
  ``int32`` (bit 31 is the sign bit; read them as unsigned).

So ``W[r, 4 * (j // 2) + p(r, j)] = values[r, j]`` and every other entry is 0. Bytes per weight: half a
value plus 1/16 byte of metadata: 56.25% of dense for 16-bit dtypes.

A ``"packed"`` checkpoint is a Hugging Face folder whose safetensors hold, for every packed linear ``NAME``,
``NAME.values``, ``NAME.meta`` (and ``NAME.bias`` when present) instead of ``NAME.weight``; all other tensors
(embeddings, ``lm_head``, norms, linears left dense) are stored as usual. ``config.json`` carries
``quantization_config = {"quant_method": "llmprune_sparse24", "format_version": 1, "modules": [...]}``
listing the packed linears. :func:`load_packed` (used by ``llmprune.load(DIR)``) builds the model on the meta
device, swaps the listed linears for :class:`Sparse24Linear` and fills every tensor straight from the
safetensors files, so the dense model never exists in memory. After ``import llmprune``,
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` works too (through a registered quantizer) on
transformers versions with ``register_quantizer`` (5.x).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.shards import DEFAULT_SHARD_SIZE, plan_shards, shard_name, write_index

log = logging.getLogger(__name__)

QUANT_METHOD = "llmprune_sparse24"
FORMAT_VERSION = 1
#: Sparsity patterns whose masks always fit the 2:4 layout (at most 2 non-zeros per aligned group of 4).
PACKABLE_PATTERNS = ("2:4", "1:4", "1:2")
#: Largest number of input rows handled by the Triton kernel; above it, unpack + dense matmul.
KERNEL_MAX_M = 16


# --------------------------------------------------------------------------- pack / unpack


def meta_words(in_features: int) -> int:
    """Number of ``int32`` metadata words per row for ``in_features`` input columns."""
    return (in_features // 2 + 15) // 16


def is_24(weight: torch.Tensor) -> bool:
    """True iff ``weight`` (``[out, in]``) has at most 2 non-zeros in every aligned group of 4 columns."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


@functools.cache
def _group_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each 4-bit occupancy mask of a group: the two stored positions (non-zeros first, then the lowest
    free ones, increasing) and whether the group is 2:4 (at most two non-zeros)."""
    pos = torch.zeros(16, 2, dtype=torch.int64)
    ok = torch.zeros(16, dtype=torch.bool)
    for mask in range(16):
        nz = [p for p in range(4) if mask >> p & 1]
        ok[mask] = len(nz) <= 2
        chosen = sorted((nz + [p for p in range(4) if p not in nz])[:2]) if len(nz) <= 2 else [0, 1]
        pos[mask] = torch.tensor(chosen)
    return pos.to(device), ok.to(device)


def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4-sparse ``[out, in]`` weight into ``(values [out, in/2], meta [out, ceil(in/32)] int32)``.

    See the module docstring for the layout. ``unpack_24(*pack_24(w))`` equals ``w`` exactly.

    Raises:
        ValueError: if ``weight`` is not 2-D, ``in`` is not a multiple of 4, or a group of 4 holds more
            than 2 non-zeros (the message names the first offending row and group).
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_24 expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"pack_24: input dim {cols} is not a multiple of 4; the weight cannot be 2:4")
    groups = weight.reshape(rows, cols // 4, 4)
    bits = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=weight.device)
    occupancy = ((groups != 0).to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)  # [rows, G], 4-bit mask
    lut_pos, lut_ok = _group_tables(weight.device)
    bad = ~lut_ok[occupancy.long()]
    if bool(bad.any()):
        r, g = bad.nonzero()[0].tolist()
        n = int((groups[r, g] != 0).sum())
        raise ValueError(
            f"weight is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold {n} non-zeros "
            f"({int(bad.sum())} of {bad.numel()} groups exceed 2); prune it with sparsity 2:4 first"
        )
    idx = lut_pos[occupancy.long()]  # [rows, G, 2] positions, increasing
    values = groups.gather(-1, idx).reshape(rows, cols // 2).contiguous()
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int64)  # group g -> bits 4*(g%8) of word g//8
    nwords = meta_words(cols)
    pad = nwords * 8 - cols // 4
    if pad:
        nibbles = F.pad(nibbles, (0, pad))
    shifts = torch.arange(0, 32, 4, device=weight.device, dtype=torch.int64)
    words = (nibbles.reshape(rows, nwords, 8) << shifts).sum(-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return values, words.contiguous()


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_24`: ``[out, in/2]`` values + ``int32`` meta -> dense ``[out, in]`` weight."""
    if values.dim() != 2 or meta.dim() != 2 or values.shape[0] != meta.shape[0]:
        raise ValueError(f"unpack_24: bad shapes values {tuple(values.shape)}, meta {tuple(meta.shape)}")
    rows, half = values.shape
    if half % 2 or meta.shape[1] != (half + 15) // 16 or meta.dtype != torch.int32:
        raise ValueError(
            f"unpack_24: values {tuple(values.shape)} / meta {tuple(meta.shape)} {meta.dtype} do not match the "
            "packed 2:4 layout (meta must be int32 [out, ceil(in/32)])"
        )
    shifts = torch.arange(0, 32, 2, device=meta.device, dtype=torch.int32)
    codes = ((meta.unsqueeze(-1) >> shifts) & 3).reshape(rows, -1)[:, :half].to(torch.int64)
    cols = 2 * half
    col = 4 * (torch.arange(half, device=values.device) // 2) + codes
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense.scatter_(1, col, values)
    return dense


# --------------------------------------------------------------------------- module


class Sparse24Linear(nn.Module):
    """A linear layer whose weight is stored packed 2:4 (``values`` + ``meta``, see the module docstring).

    ``forward`` runs the Triton kernel (:func:`llmprune.kernels.sparse24_linear.sparse24_linear`) on CUDA for
    fp16/bf16 inputs of up to :data:`KERNEL_MAX_M` rows, else unpacks and uses ``F.linear`` (CPU, prefill).
    """

    #: ``None``: kernel on CUDA only; ``True``: also on CPU (through ``TRITON_INTERPRET=1``; tests); ``False``: never.
    use_kernel: bool | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=None, device=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"Sparse24Linear needs in_features divisible by 4, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        self.values = nn.Parameter(
            torch.zeros(out_features, in_features // 2, dtype=dtype, device=device), requires_grad=False
        )
        self.register_buffer(
            "meta", torch.zeros(out_features, meta_words(in_features), dtype=torch.int32, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Sparse24Linear:
        """Pack a 2:4-sparse ``nn.Linear`` (raises ``ValueError`` if it is not 2:4)."""
        w = linear.weight.data
        values, meta = pack_24(w)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device="meta")
        mod.values = nn.Parameter(values, requires_grad=False)
        mod.meta = meta
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (zeros included)."""
        return unpack_24(self.values, self.meta)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dense weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data.clone(), requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Sparse24Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            (x.is_cuda if self.use_kernel is None else self.use_kernel)
            and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == self.values.dtype
            and rows <= KERNEL_MAX_M
        ):
            from llmprune.kernels.sparse24_linear import sparse24_linear

            y = sparse24_linear(
                x.reshape(rows, x.shape[-1]).contiguous(), self.values, self.meta, self.bias, check=False
            )
            return y.reshape(*x.shape[:-1], self.out_features)
        w = self.dense_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4 packed"


# --------------------------------------------------------------------------- model surgery


def packable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linears to store packed: ``Sparse24Linear`` modules, and 2:4-sparse ``nn.Linear`` in the decoder layers.

    ``lm_head``, embeddings and anything outside the decoder layers stay dense, as do linears that are not
    2:4 (e.g. left dense by ``--ignore``).
    """
    from llmprune.model.access import DEFAULT_IGNORE, decoder_layers_path, matches_any

    prefix = decoder_layers_path(model) + "."
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Sparse24Linear):
            out[name] = mod
        elif (
            isinstance(mod, nn.Linear)
            and name.startswith(prefix)
            and not matches_any(name, DEFAULT_IGNORE)
            and mod.in_features % 4 == 0
            and mod.weight.device.type != "meta"
            and is_24(mod.weight.data)
        ):
            out[name] = mod
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def pack_model(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace 2:4 linears by :class:`Sparse24Linear` in place (all packable ones unless ``names``)."""
    targets = packable_linears(model) if names is None else {n: model.get_submodule(n) for n in names}
    for name, mod in targets.items():
        if isinstance(mod, nn.Linear):
            try:
                _swap(model, name, Sparse24Linear.from_linear(mod))
            except ValueError as exc:
                raise LlmpruneError(f"{name}: {exc}") from None
    return sorted(targets)


def unpack_model(model: nn.Module) -> list[str]:
    """Replace every :class:`Sparse24Linear` by a dense ``nn.Linear`` in place; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)]
    for name in names:
        _swap(model, name, model.get_submodule(name).to_linear())
    return names


def _empty_sparse_modules(model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
    """Swap the (meta) linears ``names`` for empty (meta) ``Sparse24Linear`` modules."""
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise LlmpruneError(f"packed checkpoint lists module {name!r}, which the model does not have") from None
        if not isinstance(lin, (nn.Linear, Sparse24Linear)):
            raise LlmpruneError(f"packed checkpoint lists {name!r}, which is a {type(lin).__name__}, not a linear")
        _swap(
            model,
            name,
            Sparse24Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=dtype, device="meta"),
        )


# --------------------------------------------------------------------------- checkpoint format


def check_recipe(recipe) -> None:
    """Cheap pre-check run before any work: every prune stage must produce a 2:4-compatible pattern."""
    from llmprune.prune.registry import method_for_config

    for i, stage in enumerate(recipe.stages):
        pat = stage.sparsity
        if str(pat) not in PACKABLE_PATTERNS:
            where = f" (stage {i + 1}, {method_for_config(stage).name})" if len(recipe.stages) > 1 else ""
            raise ConfigError(
                f"format 'packed' stores 2:4 sparsity, but sparsity {pat}{where} is not 2:4 "
                "(use --sparsity 2:4, or --format dense)"
            )


def _quant_config(names: list[str]) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": names}


def save_packed(model: nn.Module, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_SIZE) -> None:
    """Save ``model`` with its 2:4 linears packed (the ``"packed"`` format's saver)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    targets = packable_linears(model)
    if not targets:
        raise LlmpruneError(
            "format 'packed': no 2:4-sparse linear found in the decoder layers; prune with --sparsity 2:4 first"
        )
    names = sorted(targets)
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
    config.quantization_config = _quant_config(names)
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


def load_packed(directory: str | os.PathLike, dtype="auto", device=None, **_):
    """Load a ``"packed"`` checkpoint into a model whose packed linears are :class:`Sparse24Linear`.

    The model skeleton is built on the meta device; each tensor is read from the safetensors files directly
    onto ``device`` (default CPU) and cast to ``dtype`` (``"auto"``: the checkpoint's), so no dense copy of
    the packed weights is ever made.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict):
        qc = qc.to_dict() if qc is not None else {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise LlmpruneError(f"{directory} is not a packed 2:4 checkpoint (no {QUANT_METHOD} quantization_config)")
    if int(qc.get("format_version", 1)) > FORMAT_VERSION:
        raise LlmpruneError(
            f"{directory}: packed format version {qc['format_version']} is newer than this llmprune supports"
        )
    names = list(qc.get("modules", []))
    del config.quantization_config
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _empty_sparse_modules(model, names, dtype)
    dev_str = "cpu" if device.type == "cpu" else str(device if device.index is not None else f"{device.type}:0")
    loaded: set[str] = set()
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
                loaded.add(key)
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




# --------------------------------------------------------------------------- transformers integration


def register_transformers_quantizer() -> bool:
    """Let ``AutoModelForCausalLM.from_pretrained`` read packed checkpoints (transformers >= 5)."""
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - older transformers
        return False
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return True

    @register_quantization_config(QUANT_METHOD)
    class Sparse24QuantConfig(QuantizationConfigMixin):
        """``quantization_config`` of a packed 2:4 checkpoint (see :mod:`llmprune.runtime.sparse24`)."""

        def __init__(self, modules=(), format_version: int = FORMAT_VERSION, **kwargs):
            self.quant_method = QUANT_METHOD
            self.modules = list(modules)
            self.format_version = format_version

        def to_dict(self):
            return _quant_config(self.modules) | {"format_version": self.format_version}

    @register_quantizer(QUANT_METHOD)
    class Sparse24HfQuantizer(HfQuantizer):
        """Swaps the listed linears for :class:`Sparse24Linear` before transformers fills the weights."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            dtype = kwargs.get("dtype") or getattr(model.config, "dtype", None) or torch.float32
            _empty_sparse_modules(model, self.quantization_config.modules, dtype)
            return model

        def is_serializable(self, *args, **kwargs):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return True

