"""Safetensors shards: one shard planner for every writer, and a writer that fills planned shards in any order.

The planner is huggingface_hub's (:func:`huggingface_hub.split_torch_state_dict_into_shards`, the one
``transformers``' ``save_pretrained`` uses): tensors in order, a new shard when the next one would pass
``max_shard_size``, a tensor larger than the limit in a shard of its own. Two writers follow it:

* :func:`save_shards` (whole state dict in memory, e.g. the packed format's saver) is
  :func:`huggingface_hub.save_torch_state_dict` itself;
* :class:`ShardWriter` (the streaming engine's) has no library equivalent: it writes each shard's header up
  front and each tensor's bytes at its final offset as soon as it is ready (in any order, across a resume), so
  a whole state dict never has to be in memory. It gets its plan from :func:`plan_shards`, which runs the same
  library planner on meta tensors (only shapes and dtypes count), so both writers cut shards identically.

File names and the ``model.safetensors.index.json`` index are transformers' (``model.safetensors`` alone, else
``model-0000i-of-0000n.safetensors`` + index; the streaming writer always uses the numbered names and index).
Atomicity is the callers': both write into a work directory that is swapped into place at the end
(:mod:`llmprune.formats.output`, the engine's ``<output>.partial/``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from llmprune.errors import LlmpruneError

#: Largest shard written (5 GB, as transformers' default).
DEFAULT_SHARD_SIZE = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


#: transformers' safetensors file names (``suffix``: "" or ``-0000i-of-0000n``).
SHARD_PATTERN = "model{suffix}.safetensors"


def plan_shards(
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    *,
    single_name: bool = True,
) -> dict[str, list[str]]:
    """Cut tensors (in order) into shards of at most ``max_shard_size`` bytes with huggingface_hub's planner.

    Args:
        entries: ``(key, dtype, shape)`` of each tensor, in the order they are stored.
        max_shard_size: byte limit per shard (int, or a string such as ``"5GB"``); a single larger tensor gets
            a shard of its own.
        single_name: a lone shard is ``model.safetensors`` (else ``model-00001-of-00001.safetensors``).

    Returns:
        ``{file name: keys}`` in shard order, e.g. ``{"model-00001-of-00002.safetensors": ["a", "b"], ...}``;
        at least one (possibly empty) shard.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    # Meta tensors: the planner sizes each by its storage (numel x element size) and, for meta, assumes no sharing.
    meta = {key: torch.empty(shape, dtype=dtype, device="meta") for key, dtype, shape in entries}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    groups = list(split.filename_to_tensors.values()) or [[]]
    return {shard_name(i, len(groups), single_name=single_name): list(g) for i, g in enumerate(groups)}


def save_shards(
    tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE
) -> None:
    """Write an in-memory state dict as transformers-style safetensors shards (+ index when more than one).

    :func:`huggingface_hub.save_torch_state_dict` (same planner as :func:`plan_shards`; per-file metadata
    ``{"format": "pt"}``). Tensors must not share storage (drop tied copies first): a view is copied so its
    storage, which the planner counts, is its own size.
    """
    from huggingface_hub import save_torch_state_dict

    Path(directory).mkdir(parents=True, exist_ok=True)
    own = {}
    for key, t in tensors.items():
        t = t.detach()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
        own[key] = t if whole else t.clone(memory_format=torch.contiguous_format)
    save_torch_state_dict(own, directory, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)


def shard_name(index: int, count: int, *, single_name: bool = True) -> str:
    """File name of shard ``index`` of ``count``: ``model.safetensors`` alone, else ``model-0000i-of-0000n``."""
    if count == 1 and single_name:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json`` (transformers' sharded-checkpoint index)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Safetensors shards planned up front and filled tensor by tensor, in any order.

    Each shard's header (names, dtypes, shapes, offsets) is written when the writer is created and the file is
    sized to its final length; :meth:`write` puts one tensor's bytes at its offset. Files are plain
    safetensors once every tensor is written; :meth:`finish` adds ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        directory: Path,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_size: int = DEFAULT_SHARD_SIZE,
        *,
        reopen: bool = False,
    ) -> None:
        self.directory = Path(directory)
        for key, dtype, _ in plan:
            if dtype not in _ST_DTYPES:
                raise LlmpruneError(f"cannot write dtype {dtype} of {key} to safetensors")
        by_key = {key: (key, dtype, tuple(shape)) for key, dtype, shape in plan}
        shards = plan_shards(list(by_key.values()), max_shard_size, single_name=False)
        self.where: dict[str, tuple[str, int, torch.dtype, tuple[int, ...], int]] = {}
        self.files: list[str] = []
        self.total_size = 0
        self._fh: dict[str, object] = {}
        for fname, keys in shards.items():
            shard = [by_key[k] for k in keys]
            header: dict = {"__metadata__": {"format": "pt"}}
            off = 0
            entries = []
            for key, dtype, shape in shard:
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
                entries.append((key, off, dtype, shape, nbytes))
                off += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            for key, o, dtype, shape, nbytes in entries:
                self.where[key] = (fname, start + o, dtype, shape, nbytes)
            self.files.append(fname)
            self.total_size += off
            path = self.directory / fname
            if reopen and path.is_file() and path.stat().st_size == start + off:
                continue
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(start + off)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        fname, offset, dtype, shape, nbytes = self.where[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise LlmpruneError(f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        if fname not in self._fh:
            self._fh[fname] = open(self.directory / fname, "r+b")  # noqa: SIM115 - kept open across writes
        f = self._fh[fname]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        f.seek(offset)
        f.write(memoryview(data))

    def flush(self) -> None:
        for f in self._fh.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.flush()
        for f in self._fh.values():
            f.close()
        self._fh.clear()

    def finish(self) -> None:
        self.close()
        write_index(self.directory, {k: w[0] for k, w in self.where.items()}, self.total_size)
