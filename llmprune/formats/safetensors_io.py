"""Safetensors files and checkpoint folders, read without trusting them: the tensor half of the reading layer.

Together with :mod:`llmprune.formats.reading` (JSON, torch pickles, index paths) this is the one reading layer:
a file that is missing, truncated or garbled gives one :class:`~llmprune.errors.LlmpruneError` naming it, never
a traceback from ``safetensors`` underneath.

* :func:`read_safetensors_header` / :func:`open_safetensors` / :func:`load_safetensors`: safetensors files;
  the header (names, dtypes, shapes, data offsets) is parsed and checked against the file size before
  ``safetensors`` maps it.
* :func:`checkpoint_files` / :func:`checkpoint_tensors`: the weight files of a Hugging Face checkpoint folder
  (safetensors, sharded or not, or ``pytorch_model.bin``) and name -> (dtype, shape) of every tensor, headers
  only.
* :func:`is_finite` / :func:`dtype_compatible`: the per-tensor checks the loaders apply.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.errors import LlmpruneError
from llmprune.formats.reading import first_line, index_weight_map, load_torch

#: safetensors refuses headers above this size (100 MB); so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"

#: Bytes per element of each safetensors dtype (sub-byte dtypes as fractions).
_ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8, "F4": 0.5,
    "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor: its dtype (safetensors spelling, e.g. ``"BF16"``) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return is_float_dtype(self.dtype)


def is_float_dtype(dtype: str | torch.dtype) -> bool:
    """Whether a safetensors dtype name (``"F32"``, ``"BF16"``, ``"F8_E4M3"``) or torch dtype is floating point."""
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return dtype.startswith("F") or dtype == "BF16"


def dtype_compatible(stored: str | torch.dtype, expected: torch.dtype) -> bool:
    """True when a tensor stored as ``stored`` may fill a tensor of dtype ``expected`` (floats cast to floats;
    integers and booleans are never cast from or to floats)."""
    return is_float_dtype(stored) == expected.is_floating_point


# ------------------------------------------------------------------------------------------ safetensors


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor name -> :class:`TensorInfo` of safetensors file ``path``, from its header alone.

    The header is checked the way ``safetensors`` checks it, before anything is mapped: its length fits the
    file (and 100 MB), it is a UTF-8 JSON object, every entry has a known dtype, a shape of non-negative ints
    and data offsets that match the shape, and the tensors tile the data section exactly (a truncated or
    padded file is refused).

    Raises:
        LlmpruneError: naming the file and what is wrong.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlmpruneError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise LlmpruneError(
                    f"{path}: not a valid safetensors file (header length {n} exceeds the file's {size} bytes)"
                    if n <= MAX_HEADER_BYTES else
                    f"{path}: not a valid safetensors file (header length {n} is over the {MAX_HEADER_BYTES}-byte limit)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise LlmpruneError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise LlmpruneError(f"{path}: not a valid safetensors file (garbled header)") from None
    if not isinstance(header, dict):
        raise LlmpruneError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise LlmpruneError(f"{path}: not a valid safetensors file (__metadata__ is not a string map)")
            continue
        bad = f"{path}: not a valid safetensors file (bad header entry for tensor {key!r})"
        if not isinstance(entry, dict):
            raise LlmpruneError(bad)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEM_BYTES:
            raise LlmpruneError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise LlmpruneError(bad)
        nbytes = math.prod(shape) * _ITEM_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise LlmpruneError(
                f"{path}: tensor {key!r} ({dtype} {tuple(shape)}) has {offsets[1] - offsets[0]} bytes of data, "
                f"expected {nbytes:g}"
            )
        out[key] = TensorInfo(dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise LlmpruneError(f"{path}: not a valid safetensors file (tensor {key!r} overlaps or leaves a gap)")
        end = stop
    if end != data_len:
        state = "truncated" if end > data_len else "has trailing bytes"
        raise LlmpruneError(
            f"{path}: not a valid safetensors file ({state}: the header describes {end} data bytes, "
            f"the file holds {data_len})"
        )
    return out


class SafetensorsFile:
    """An open safetensors file (``safetensors.safe_open``) whose errors are :class:`LlmpruneError` naming it.

    Use as a context manager or keep it; ``keys()``, ``info(key)``, ``get(key)``, ``get_slice(key)``.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.header = read_safetensors_header(self.path)
        try:
            self._f = safe_open(str(self.path), framework="pt", device=device)
        except Exception as exc:  # SafetensorError, OSError: anything safetensors still refuses
            raise LlmpruneError(f"{self.path}: cannot open safetensors file: {first_line(exc)}") from None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f = None

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def info(self, key: str) -> TensorInfo:
        return self.header[key]

    def get_slice(self, key: str):
        return self._f.get_slice(key)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as exc:
            raise LlmpruneError(f"{self.path}: cannot read tensor {key!r}: {first_line(exc)}") from None


def open_safetensors(path: str | os.PathLike, device: str = "cpu") -> SafetensorsFile:
    """A checked, open safetensors file (see :class:`SafetensorsFile`); raises :class:`LlmpruneError`."""
    return SafetensorsFile(path, device)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file ``path`` (like ``safetensors.torch.load_file``, errors as LlmpruneError)."""
    path = Path(path)
    if not path.is_file():
        raise LlmpruneError(f"{path}: file not found")
    with open_safetensors(path, device) as f:
        return {k: f.get(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------- checkpoints


def checkpoint_files(directory: str | os.PathLike) -> tuple[str, dict[str, Path]] | None:
    """The weight files transformers would read from ``directory``, in its order of preference.

    Returns:
        ``(kind, {tensor name or "": file})`` with kind ``"safetensors"`` or ``"torch"`` (for a single file the
        map is ``{"": path}``), or None when the folder holds neither.
    """
    d = Path(directory)
    if (d / SAFETENSORS_SINGLE).is_file():
        return "safetensors", {"": d / SAFETENSORS_SINGLE}
    if (d / SAFETENSORS_INDEX).is_file():
        return "safetensors", index_weight_map(d / SAFETENSORS_INDEX)
    if (d / TORCH_SINGLE).is_file():
        return "torch", {"": d / TORCH_SINGLE}
    if (d / TORCH_INDEX).is_file():
        return "torch", index_weight_map(d / TORCH_INDEX)
    return None


_TORCH_TO_ST = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
}


def _torch_file_tensors(path: Path) -> dict[str, TensorInfo]:
    state = load_torch(path, map_location="meta")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LlmpruneError(f"{path}: not a state dict of tensors")
    return {k: TensorInfo(_TORCH_TO_ST.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in state.items()}


def checkpoint_tensors(directory: str | os.PathLike) -> dict[str, TensorInfo] | None:
    """Name -> :class:`TensorInfo` of every tensor of the checkpoint folder ``directory`` (headers only; a
    ``pytorch_model.bin`` is read with ``weights_only`` onto the meta device), or None without weight files.

    Raises:
        LlmpruneError: a corrupt file, an index entry outside the folder or naming a tensor its shard lacks,
            a tensor stored in two shards.
    """
    found = checkpoint_files(directory)
    if found is None:
        return None
    kind, files = found
    read = read_safetensors_header if kind == "safetensors" else _torch_file_tensors
    out: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for path in dict.fromkeys(files.values()):
        if not path.is_file():
            raise LlmpruneError(f"{directory}: shard {path.name} listed in the index is missing")
        for key, info in read(path).items():
            if key in out:
                raise LlmpruneError(f"{directory}: tensor {key!r} is stored twice ({where[key].name}, {path.name})")
            out[key], where[key] = info, path
    for key, path in files.items():
        if key and where.get(key) != path:
            raise LlmpruneError(
                f"{directory}: the index places tensor {key!r} in {path.name}, which does not hold it"
            )
    return out


# ----------------------------------------------------------------------------------------------- values


def is_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every element of ``t`` is finite (non-float tensors always are).

    Fast path: an fp32 sum (NaN and inf propagate through IEEE sums, so a finite sum proves every element
    finite); only when it is not finite (a NaN/inf, or an overflowing sum of huge values) are the elements
    checked, ``chunk`` at a time so the check never allocates more than ``chunk`` booleans.
    """
    if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.detach().sum(dtype=torch.float32 if t.element_size() <= 4 else t.dtype))):
        return True
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), chunk):
        if not bool(torch.isfinite(flat[i:i + chunk]).all()):
            return False
    return True
