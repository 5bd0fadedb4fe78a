"""Where the streaming engine reads weights from: a safetensors checkpoint directory, memory-mapped.

:class:`SafetensorsSource` hands out one tensor at a time from the memory-mapped files
(``safetensors.safe_open``), so reading a checkpoint costs no memory beyond the tensors in use; every file is
checked by :mod:`llmprune.formats.safetensors_io` first (headers, index entries inside the directory, finite
values); :func:`local_safetensors` and :func:`hub_safetensors` find such a directory for a model reference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import read_metadata
from llmprune.formats.reading import index_weight_map, preview
from llmprune.formats.safetensors_io import (
    SAFETENSORS_INDEX,
    SafetensorsFile,
    TensorInfo,
    is_finite,
    open_safetensors,
    read_safetensors_header,
)

log = logging.getLogger(__name__)

#: Files of a Hub snapshot the streaming engine needs (weights, config, tokenizer).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class SafetensorsSource:
    """The tensors of a safetensors checkpoint directory, read lazily from memory-mapped files."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():  # every shard named by the index must stay inside the directory and hold its tensors
            named = index_weight_map(index)
            infos: dict[str, TensorInfo] = {}
            for path in dict.fromkeys(named.values()):
                if not path.is_file():
                    raise LlmpruneError(f"{self.directory}: shard {path.name} listed in the index is missing")
                header = read_safetensors_header(path)
                infos.update({k: header[k] for k, p in named.items() if p == path and k in header})
            lacking = [k for k in named if k not in infos]
            if lacking:
                raise LlmpruneError(
                    f"{index}: the shard the index names does not hold {preview(lacking)} "
                    f"({lacking[0]} -> {named[lacking[0]].name})"
                )
            weight_map = {k: str(p.relative_to(self.directory)) for k, p in named.items()}
        else:  # one file: transformers' name (other *.safetensors beside it, e.g. attention gates, are not ours)
            single = self.directory / "model.safetensors"
            files = [single] if single.is_file() else sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise LlmpruneError(f"no safetensors files in {self.directory}")
            weight_map, infos = {}, {}
            for f in files:
                header = read_safetensors_header(f)
                weight_map.update(dict.fromkeys(header, f.name))
                infos.update(header)
        self.weight_map: dict[str, str] = weight_map
        self.infos: dict[str, TensorInfo] = infos
        self._handles: dict[str, SafetensorsFile] = {}

    @staticmethod
    def find(directory: str | os.PathLike) -> Path | None:
        """``directory`` if it is a dense safetensors checkpoint the streaming engine can read, else None."""
        d = Path(directory)
        if not (d.is_dir() and (d / "config.json").is_file() and any(d.glob("*.safetensors"))):
            return None
        meta = read_metadata(d)
        if meta and meta.get("format", "dense") != "dense":  # packed/structured inputs need their own loader
            return None
        if (d / "attn_gates.safetensors").is_file():  # learned gates are attached by the in-memory loader only
            return None
        return d

    def _handle(self, key: str) -> SafetensorsFile:
        fname = self.weight_map[key]
        if fname not in self._handles:
            self._handles[fname] = open_safetensors(self.directory / fname)
        return self._handles[fname]

    def keys(self) -> list[str]:
        """Tensor names, in the checkpoint's order."""
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` (read from the header; no data is loaded)."""
        return self.infos[key].shape

    def dtype(self, key: str) -> str:
        """Stored dtype of tensor ``key``, in safetensors' spelling (``"BF16"``, ``"I64"``; from the header)."""
        return self.infos[key].dtype

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (CPU, the checkpoint's dtype; may be backed by the file mapping).

        Raises:
            LlmpruneError: when a floating tensor holds NaN or infinite values (naming it and its file).
        """
        t = self._handle(key).get(key)
        if not is_finite(t):
            raise LlmpruneError(f"{self.directory / self.weight_map[key]}: tensor {key!r} holds NaN or infinite values")
        return t

    def total_bytes(self) -> int:
        """Size of the checkpoint's safetensors files."""
        return sum((self.directory / f).stat().st_size for f in set(self.weight_map.values()))

    def close(self) -> None:
        """Drop the open file mappings (their pages leave the process's resident set)."""
        self._handles.clear()


def local_safetensors(model_ref: str) -> Path | None:
    """The local safetensors directory for a resolved model reference, if any."""
    return SafetensorsSource.find(model_ref)


def hub_safetensors(model_ref: str) -> Path | None:
    """Download (or find in the HF cache) a Hub model's safetensors + config + tokenizer files."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(model_ref, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, no such repo
        log.info("no safetensors snapshot for %s: %s", model_ref, type(exc).__name__)
        return None
    return SafetensorsSource.find(d)
