"""What a checkpoint folder holds, measured from its files: ``llmprune info DIR`` and the model card's facts.

:func:`inspect_checkpoint` reads ``config.json``, ``llmprune.json``, ``eval_results.json`` and the weight files
(safetensors headers for sizes and dtypes; the tensors themselves, one at a time, for the sparsity), so what it
reports is what the files say, not what the metadata claims: the parameter count, the bytes, and per linear
module the measured fraction of zeros and whether an N:M pattern holds (packed 2:4 linears are unpacked and
checked the same way). Nothing here loads a model or needs the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.evaluate.results import read_results
from llmprune.formats.checkpoint import read_metadata
from llmprune.formats.metadata import resolve_base_model
from llmprune.formats.reading import read_json
from llmprune.formats.safetensors_io import checkpoint_files, checkpoint_tensors, open_safetensors
from llmprune.formats.sparse24 import QUANT_METHOD, unpack_24
from llmprune.sparsity import SparsityPattern, check_nm

__all__ = ["checkpoint_format", "inspect_checkpoint", "parameter_count"]

#: safetensors dtype spelling -> bytes per element
_ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def checkpoint_format(directory: str | os.PathLike, config: dict | None = None, meta: dict | None = None) -> str:
    """``dense``, ``structured`` or ``packed``: as ``llmprune.json`` records it, else as ``config.json`` shows."""
    if meta and isinstance(meta.get("format"), str):
        return meta["format"]
    config = config or {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return "packed"
    if config.get("llmprune_intermediate_sizes") is not None:
        return "structured"
    return "dense"


def parameter_count(tensors: dict) -> dict[str, int]:
    """``{"parameters": dense-equivalent count, "stored": elements stored}`` from safetensors headers.

    A packed linear stores ``values [out, in/2]`` + ``meta``; it counts as its dense ``out * in`` parameters
    (``meta`` words are bookkeeping, not parameters). Tied weights are stored once and counted once.
    """
    params = stored = 0
    for name, info in tensors.items():
        n = _numel(info.shape)
        if name.endswith(".meta") and info.dtype == "I32" and f"{name[:-5]}.values" in tensors:
            continue
        stored += n
        params += 2 * n if name.endswith(".values") and f"{name[:-7]}.meta" in tensors else n
    return {"parameters": params, "stored": stored}


def _patterns(meta: dict | None) -> list[SparsityPattern]:
    out = []
    for stage in ((meta or {}).get("recipe") or {}).get("prune") or []:
        try:
            pat = SparsityPattern.parse(stage.get("sparsity"))
        except Exception:  # an unknown recorded value: nothing to check against
            continue
        if pat.is_nm:
            out.append(pat)
    return out


def _module_sparsity(directory: Path, tensors: dict, patterns: list[SparsityPattern]) -> dict[str, dict]:
    """Per 2-D linear weight of the decoder layers: shape, measured zeros, N:M validity (read one at a time)."""
    found = checkpoint_files(directory)
    if found is None or found[0] != "safetensors":
        return {}
    files = sorted(set(found[1].values()))
    out: dict[str, dict] = {}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                info = f.info(key)
                if ".layers." not in key and ".h." not in key:
                    continue  # embeddings, head, norms: never pruned
                if key.endswith(".weight") and len(info.shape) == 2:
                    name, w = key[:-7], f.get(key)
                elif key.endswith(".values") and f"{key[:-7]}.meta" in tensors:
                    name = key[:-7]
                    meta_path = found[1].get(f"{name}.meta", path) if len(found[1]) > 1 else path
                    if meta_path == path:
                        meta_t = f.get(f"{name}.meta")
                    else:
                        with open_safetensors(meta_path) as g:
                            meta_t = g.get(f"{name}.meta")
                    w = unpack_24(f.get(key), meta_t)
                else:
                    continue
                entry: dict[str, Any] = {"shape": list(w.shape), "sparsity": round(float((w == 0).float().mean()), 6),
                                         "packed": key.endswith(".values")}
                for pat in patterns:
                    if w.shape[1] % pat.m == 0:
                        entry[f"{pat.n}:{pat.m}"] = bool(check_nm(w != 0, pat.n, pat.m))
                out[name] = entry
    return dict(sorted(out.items()))


def _summary(modules: dict[str, dict]) -> dict[str, Any]:
    total = sum(_numel(m["shape"]) for m in modules.values())
    zeros = sum(m["sparsity"] * _numel(m["shape"]) for m in modules.values())
    out: dict[str, Any] = {"modules": len(modules), "overall": round(zeros / total, 6) if total else None}
    nm_keys = sorted({k for m in modules.values() for k in m if ":" in k})
    for k in nm_keys:
        checked = [m[k] for m in modules.values() if k in m]
        out[f"{k}_valid"] = f"{sum(checked)}/{len(checked)}"
    return out


def inspect_checkpoint(directory: str | os.PathLike, *, sparsity: bool = True) -> dict[str, Any]:
    """A JSON-ready description of checkpoint folder ``directory`` (an llmprune checkpoint or any HF folder).

    Args:
        directory: the folder (``config.json`` + weights).
        sparsity: measure per-module sparsity from the weights (reads every tensor once; False: headers only).

    Returns:
        ``format``, ``dtype`` (of the floating-point tensors, with per-dtype counts), ``bytes`` (``weights``: weight
        files; ``total``: the folder), ``parameters`` (dense-equivalent) and ``stored_elements``, ``model_type``
        and ``architectures``, ``layers`` (per-layer FFN sizes when structured), ``base_model`` (resolved),
        ``llmprune`` facts (version, method stages, calibration, runtime options, converted_from, command),
        ``sparsity`` (``summary`` and ``modules``: shape, zeros, N:M validity) and ``results`` (``eval_results.json``).

    Raises:
        LlmpruneError: not a model folder, or unreadable files (naming the file).
    """
    d = Path(directory).expanduser()
    if not (d / "config.json").is_file():
        raise LlmpruneError(f"{directory} is not a model directory (no config.json)")
    config = read_json(d / "config.json", what="config.json") or {}
    meta = read_metadata(d)
    tensors = checkpoint_tensors(d)
    if tensors is None:
        raise LlmpruneError(f"{directory}: no weight files (model.safetensors or pytorch_model.bin)")
    found = checkpoint_files(d)
    weight_files = set(found[1].values()) if found else set()
    if found and (d / "model.safetensors.index.json").is_file():
        weight_files.add(d / "model.safetensors.index.json")
    float_counts: dict[str, int] = {}
    for info in tensors.values():
        if info.dtype in _ST_NAMES:
            float_counts[_ST_NAMES[info.dtype]] = float_counts.get(_ST_NAMES[info.dtype], 0) + _numel(info.shape)
    dtype = max(float_counts, key=float_counts.get) if float_counts else None
    count = parameter_count(tensors)
    info: dict[str, Any] = {
        "directory": str(d),
        "format": checkpoint_format(d, config, meta),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "dtype": dtype,
        "dtypes": float_counts,
        "config_dtype": config.get("dtype") or config.get("torch_dtype"),
        "parameters": count["parameters"],
        "stored_elements": count["stored"],
        "bytes": {
            "weights": sum(p.stat().st_size for p in weight_files if p.is_file()),
            "total": sum(p.stat().st_size for p in d.rglob("*") if p.is_file()),
        },
        "layers": config.get("num_hidden_layers"),
    }
    if config.get("llmprune_intermediate_sizes") is not None:
        info["intermediate_sizes"] = config["llmprune_intermediate_sizes"]
        info["kv_heads"] = config.get("llmprune_kv_heads")
    else:
        info["intermediate_sizes"] = config.get("intermediate_size")
    if meta is not None:
        try:
            info["base_model"] = resolve_base_model(d, meta)
        except LlmpruneError:
            info["base_model"] = None
        recipe = meta.get("recipe") or {}
        info["llmprune"] = {
            "version": meta.get("llmprune_version"),
            "stages": recipe.get("prune"),
            "calibration": meta.get("calibration"),
            "runtime": recipe.get("runtime") or {},
            "recorded_sparsity": (meta.get("sparsity") or {}).get("overall"),
            "converted_from": meta.get("converted_from"),
            "command": meta.get("command"),
            "convert_command": meta.get("convert_command"),
        }
    else:
        info["base_model"] = None
        info["llmprune"] = None
    if sparsity:
        modules = _module_sparsity(d, tensors, _patterns(meta))
        info["sparsity"] = {"summary": _summary(modules), "modules": modules}
    info["results"] = read_results(d)
    return json.loads(json.dumps(info, default=str))
