"""Verifying a model's checkpoint against the model: tensor names, shapes, dtypes and values.

What :func:`llmprune.model.loading.load_pretrained` checks instead of trusting transformers (which would fill a
missing tensor with random values and cast an integer one):

* :func:`verify_tensors`: the checkpoint's tensors (from the weight files' headers) against the model built on
  the meta device (or loaded): every tensor stored, none unknown, equal shapes, no integer/float mix-up;
  names transformers renames or fuses itself (:func:`renames_keys`) are left to its own report.
* :func:`check_loading_info`: transformers' own loading report must be clean.
* :func:`check_finite`: no parameter may hold NaN/inf.
* :func:`hub_tensors`: the tensors of a Hub model's cached snapshot, to check it after the download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmprune.errors import LlmpruneError
from llmprune.formats.reading import preview
from llmprune.formats.safetensors_io import TensorInfo, checkpoint_tensors, dtype_compatible, is_finite


def _pattern(patterns) -> re.Pattern | None:
    patterns = [p for p in (patterns or ()) if p]
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def renames_keys(model, names: list[str]) -> bool:
    """Whether transformers may rename or fuse checkpoint tensors when loading ``model`` (its conversion
    mapping, e.g. MoE experts; or a legacy rename matching one of ``names``), so names need not match 1:1."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            get_model_conversion_mapping,
        )
    except ImportError:  # older transformers: no conversions
        return False
    try:
        if get_model_conversion_mapping(model, add_legacy=False):
            return True
        legacy = _pattern([p for t in get_checkpoint_conversion_mapping("legacy") or () for p in t.source_patterns])
    except Exception:  # an internal API: when it changes, fall back to trusting transformers' own report
        return True
    return legacy is not None and any(legacy.search(n) for n in names)


def verify_tensors(model, tensors: dict[str, TensorInfo], where: str | os.PathLike) -> None:
    """Check the checkpoint's tensors (``tensors``: name -> dtype/shape from the headers) against ``model``
    (built on the meta device, or loaded).

    Every tensor of the model must be stored (tied tensors once, under any of their names; persistent buffers
    transformers recomputes excepted), no stored tensor may be unknown to the model (beyond the names
    transformers drops on purpose), shapes must be equal, and a floating tensor must not be stored as an
    integer one or the reverse. A checkpoint saved from the base model (no ``model.`` prefix) matches too;
    when transformers converts names for this architecture (MoE expert fusion), unmatched names are left to
    its own loading report.

    Raises:
        LlmpruneError: naming up to 3 tensors and the count.
    """
    sd = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    model_names = set(sd)

    def canonical(k: str) -> str | None:
        if k in model_names:
            return k
        if prefix and f"{prefix}.{k}" in model_names:
            return f"{prefix}.{k}"
        if prefix and k.startswith(prefix + ".") and k[len(prefix) + 1:] in model_names:
            return k[len(prefix) + 1:]
        return None

    stored = {}
    for k, info in tensors.items():
        c = canonical(k)
        if c is not None:
            stored[c] = (k, info)
    groups: dict[int, list[str]] = {}
    for name, t in sd.items():
        groups.setdefault(id(t), []).append(name)
    buffers = {n for n, _ in model.named_buffers()}
    ignore_missing = _pattern(getattr(model, "_keys_to_ignore_on_load_missing", None))
    missing = []
    for names in groups.values():
        if any(n in stored for n in names):
            continue
        if ignore_missing is not None and all(n in buffers and ignore_missing.search(n) for n in names):
            continue  # a buffer transformers recomputes
        missing.append(names[0])
    extra = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        extra.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        extra.add(r"(^|\.)position_ids$")
    ignore_unexpected = _pattern(extra)
    unexpected = [k for k in tensors if canonical(k) is None
                  and not (ignore_unexpected is not None and ignore_unexpected.search(k))]
    if (missing or unexpected) and renames_keys(model, unexpected):
        missing, unexpected = [], []  # transformers maps these names itself; its report is checked after loading
    if missing:
        raise LlmpruneError(f"{where}: checkpoint lacks {preview(sorted(missing))} of the model")
    if unexpected:
        raise LlmpruneError(f"{where}: checkpoint holds {preview(sorted(unexpected))} the model does not have")
    bad_shape = sorted(c for c, (k, info) in stored.items() if info.shape != tuple(sd[c].shape))
    if bad_shape:
        k, info = stored[bad_shape[0]]
        raise LlmpruneError(
            f"{where}: wrong shape for {preview([stored[c][0] for c in bad_shape])} "
            f"({k + ': ' if len(bad_shape) > 1 else ''}checkpoint {info.shape}, model {tuple(sd[bad_shape[0]].shape)})"
        )
    bad_dtype = sorted(c for c, (k, info) in stored.items() if not dtype_compatible(info.dtype, sd[c].dtype))
    if bad_dtype:
        k, info = stored[bad_dtype[0]]
        raise LlmpruneError(
            f"{where}: incompatible dtype for {preview([stored[c][0] for c in bad_dtype])} ({k + ' is ' if len(bad_dtype) > 1 else ''}stored as "
            f"{info.dtype}, the model's is {str(sd[bad_dtype[0]].dtype).removeprefix('torch.')}; integer and "
            "float tensors are not cast into each other)"
        )


def check_finite(model, where: str | os.PathLike) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such parameter."""
    for name, p in model.named_parameters(remove_duplicate=True):
        if not is_finite(p):
            raise LlmpruneError(f"{where}: tensor {name!r} holds NaN or infinite values")


def check_loading_info(info: dict, where: str | os.PathLike) -> None:
    """transformers' own report (``output_loading_info=True``): any missing/unexpected/mismatched key is an error."""
    for field, what in (("missing_keys", "lacks"), ("unexpected_keys", "holds unexpected"),
                        ("mismatched_keys", "has mismatched shapes for")):
        keys = [k if isinstance(k, str) else str(k[0]) for k in (info.get(field) or ())]
        if keys:
            raise LlmpruneError(f"{where}: checkpoint {what} {preview(sorted(keys))} (transformers' loading report)")
    errors = [str(e) for e in (info.get("error_msgs") or ())]
    if errors:
        raise LlmpruneError(f"{where}: loading failed: {errors[0].splitlines()[0] if errors[0] else '?'}")


def hub_tensors(ref: str) -> dict[str, TensorInfo] | None:
    """The tensors of a Hub model's cached snapshot (after transformers fetched it), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(ref, "config.json")
        if not isinstance(cfg, str):
            return None
        return checkpoint_tensors(Path(cfg).parent)
    except LlmpruneError:
        raise
    except Exception:  # not cached in the usual layout: transformers' own report still applies
        return None
