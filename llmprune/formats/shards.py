"""Safetensors shards: one shard planner for every writer, and a writer that fills planned shards in any order.

:func:`plan_shards` cuts an ordered list of tensors into shards of at most ``max_shard_size`` bytes (a tensor
larger than the limit gets a shard of its own); :class:`ShardWriter` (the streaming engine's) writes each
shard's header up front and each tensor's bytes at its final offset as soon as it is ready, so a whole state
dict never has to be in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
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


def plan_shards(sizes: list[int], max_shard_size: int = DEFAULT_SHARD_SIZE) -> list[list[int]]:
    """Group tensors (by index, in order) into shards of at most ``max_shard_size`` bytes each.

    Args:
        sizes: bytes of each tensor, in the order they are stored.
        max_shard_size: byte limit per shard; a single larger tensor gets a shard of its own.

    Returns:
        Tensor indices per shard, e.g. ``[[0, 1], [2]]``; at least one (possibly empty) shard.
    """
    shards: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


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
        sizes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in plan]
        shards = [[plan[i] for i in group] for group in plan_shards(sizes, max_shard_size)]
        n = len(shards)
        self.where: dict[str, tuple[str, int, torch.dtype, tuple[int, ...], int]] = {}
        self.files: list[str] = []
        self.total_size = 0
        self._fh: dict[str, object] = {}
        for i, shard in enumerate(shards):
            fname = shard_name(i, n, single_name=False)
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
