"""The streaming engine's model: a meta-device skeleton whose tensors are materialized a layer at a time.

:func:`build_skeleton` builds the model on the meta device (``accelerate.init_empty_weights``: no memory);
:func:`plan_output` checks it against the checkpoint (names, shapes, dtypes; tensors are checked for NaN/inf
as they are read) and lays out the output (tensor names, shapes, dtypes, the
keys of each decoder layer). :func:`load_tensors` materializes tensors from the source and :func:`to_meta`
returns them to the meta device once written.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
from pathlib import Path

import torch
from torch import nn

from llmprune.engine.source import SafetensorsSource
from llmprune.errors import LlmpruneError
from llmprune.formats.reading import first_line, preview
from llmprune.formats.safetensors_io import dtype_compatible
from llmprune.model.access import decoder_layers, decoder_layers_path
from llmprune.model.loading import load_config, parse_dtype


@dataclasses.dataclass
class Plan:
    """The output layout of a streamed checkpoint.

    Attributes:
        path: the source checkpoint directory.
        config: the model's ``transformers`` config.
        dtype: the dtype the model runs and is saved in.
        keys: output tensors, in state-dict order (tied duplicates removed).
        shapes: shape of each output tensor.
        dtypes: dtype of each output tensor.
        layer_keys: the keys of each decoder layer.
        other_keys: the keys outside the decoder layers (embeddings, final norm, head).
        prefix: the decoder layers' module path (``model.layers``).
    """

    path: Path
    config: object
    dtype: torch.dtype
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    layer_keys: list[list[str]]
    other_keys: list[str]
    prefix: str


def build_skeleton(path: Path, dtype: str | torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, object, torch.dtype]:
    """The causal LM of checkpoint ``path`` on the meta device, in eval mode with tied weights.

    Args:
        path: a safetensors checkpoint directory.
        dtype: the model dtype (``"auto"``: the config's, else the checkpoint's first tensor's, else fp32).
        trust_remote_code: passed to transformers.

    Returns:
        ``(model, config, dtype)``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(path, trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            src = SafetensorsSource(path)
            floats = [src.get(k).dtype for k in src.keys()[:1]]
            torch_dtype = floats[0] if floats and floats[0].is_floating_point else torch.float32
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except LlmpruneError:
        raise
    except Exception as exc:  # a config transformers reads but cannot build (bad sizes, unknown classes)
        raise LlmpruneError(f"cannot build the model of {path} from its config: {first_line(exc)}") from None
    model.eval()
    model.tie_weights()
    return model, config, torch_dtype


def plan_output(model: nn.Module, path: Path, torch_dtype: torch.dtype, src: SafetensorsSource) -> Plan:
    """Output layout of the skeleton ``model``, checked against the checkpoint's headers.

    Raises:
        LlmpruneError: when the checkpoint lacks tensors of the model, holds tensors the model does not have,
            or a tensor's shape differs or its dtype cannot be cast (an integer tensor for a float parameter);
            the message names up to 3 tensors and the count.
    """
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
        raise LlmpruneError(f"{path}: checkpoint lacks {preview(missing)} of the model")
    model_names = set(sd)
    ignore = _ignored_unexpected(model)
    unexpected = [k for k in src.keys() if k not in model_names and not (ignore and ignore.search(k))]
    if unexpected:
        raise LlmpruneError(f"{path}: checkpoint holds {preview(unexpected)} the model does not have")
    bad_shape = [k for k in keys if src.shape(k) != tuple(sd[k].shape)]
    if bad_shape:
        k = bad_shape[0]
        raise LlmpruneError(
            f"{path}: wrong shape for {preview(bad_shape)} ({k + ': ' if len(bad_shape) > 1 else ''}checkpoint {src.shape(k)}, model {tuple(sd[k].shape)})"
        )
    bad_dtype = [k for k in keys if not dtype_compatible(src.dtype(k), sd[k].dtype)]
    if bad_dtype:
        k = bad_dtype[0]
        raise LlmpruneError(
            f"{path}: incompatible dtype for {preview(bad_dtype)} ({k + ' is ' if len(bad_dtype) > 1 else ''}stored as {src.dtype(k)}, the model's "
            f"is {str(sd[k].dtype).removeprefix('torch.')}; integer and float tensors are not cast into each other)"
        )
    prefix = decoder_layers_path(model)
    n_layers = len(decoder_layers(model))
    layer_keys: list[list[str]] = [[] for _ in range(n_layers)]
    other = []
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    for k in keys:
        m = pat.match(k)
        (layer_keys[int(m.group(1))] if m else other).append(k)
    return Plan(path, model.config, torch_dtype, keys, {k: tuple(sd[k].shape) for k in keys},
                {k: sd[k].dtype for k in keys}, layer_keys, other, prefix)


def _ignored_unexpected(model: nn.Module) -> re.Pattern | None:
    """Checkpoint names transformers drops silently for this model (``_keys_to_ignore_on_load_unexpected``,
    stale ``rotary_emb.inv_freq`` / ``position_ids`` buffers)."""
    pats = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        pats.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        pats.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in pats)) if pats else None


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (a state-dict key of ``root``) by ``value``."""
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(name)


def to_meta(root: nn.Module, names: list[str]) -> None:
    """Return tensors ``names`` of ``root`` to the meta device (their memory is freed)."""
    sd = root.state_dict(keep_vars=True)
    for name in names:
        set_tensor(root, name, torch.empty_like(sd[name], device="meta"))


def load_tensors(model: nn.Module, keys: list[str], src: SafetensorsSource, plan: Plan, device: torch.device | str) -> None:
    """Materialize tensors ``keys`` of ``model`` on ``device`` from the source, in the planned dtypes.

    Raises:
        LlmpruneError: when a stored tensor's dtype cannot be cast to the planned one, or it holds NaN/inf
            (:meth:`SafetensorsSource.get`).
    """
    for k in keys:
        t = src.get(k)
        if not dtype_compatible(t.dtype, plan.dtypes[k]):
            raise LlmpruneError(f"{plan.path}: tensor {k!r} is stored as {t.dtype}, the model's is {plan.dtypes[k]}")
        # copy=True: safetensors may hand out tensors backed by its private file mapping; pruning them in place
        # would turn the mapped pages into anonymous copy-on-write memory that lives as long as the mapping.
        set_tensor(model, k, t.to(device=device, dtype=plan.dtypes[k], copy=True))
    if any(k in plan.other_keys for k in keys):
        model.tie_weights()


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move the materialized buffers of ``module`` (e.g. non-persistent rotary tables) to ``device``."""
    for name, b in module.named_buffers():
        if b.device.type != "meta" and b.device != device:
            set_tensor(module, name, b.to(device))


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS after each layer (glibc keeps it otherwise, so the resident size
    would creep up with depth through fragmentation although nothing is live)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
