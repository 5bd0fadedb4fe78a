"""Calibration activations of the streaming engine: the hidden states entering the current decoder layer.

They are the largest state besides one layer's weights: kept on the device while they fit the budget, else in
CPU RAM (CUDA runs) or only on disk (:func:`store_mode`). In every mode the states at each layer boundary are
also saved as files, which is what ``--resume`` restarts from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: Share of the GPU's memory the activations may take when no budget is given.
DEVICE_SHARE = 0.3


def store_mode(nbytes: int, device: torch.device, budget: int | None) -> str:
    """Where ``nbytes`` of activations live: ``"device"``, ``"cpu"`` or ``"disk"``.

    Args:
        nbytes: size of this rank's hidden states at one layer boundary.
        device: where the layers run.
        budget: bytes allowed on the device (CUDA) or in RAM (CPU runs); None: 30% of the GPU's memory on
            CUDA, unlimited RAM on CPU.
    """
    if device.type == "cuda":
        if budget is None:
            budget = int(DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory)
        return "device" if nbytes <= budget else "cpu"
    return "cpu" if budget is None or nbytes <= budget else "disk"


class HiddenStore:
    """Hidden states (``[b, s, hidden]`` per batch) of this rank's calibration batches at the current layer.

    Mode ``device``/``cpu``: kept in memory there. Mode ``disk``: only in the per-layer files (loaded one batch
    at a time). In every mode the states at each layer boundary are also saved as ``L{layer}/b{batch}`` files
    (what ``--resume`` restarts from).
    """

    def __init__(self, mode: str, device: torch.device, directory: Path) -> None:
        self.mode, self.device, self.directory = mode, device, Path(directory)
        self.data: dict[int, torch.Tensor] = {}
        self.layer = 0

    def _file(self, layer: int, g: int) -> Path:
        return self.directory / f"L{layer}" / f"b{g}.safetensors"

    def _save(self, layer: int, g: int, t: torch.Tensor) -> None:
        path = self._file(layer, g)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"hidden": t.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)

    def _load(self, layer: int, g: int) -> torch.Tensor:
        with safe_open(self._file(layer, g), framework="pt") as f:
            return f.get_tensor("hidden")

    def init(self, layer: int, tensors: dict[int, torch.Tensor] | None, batches: list[int]) -> None:
        """Start at ``layer`` with the given states of global batches ``batches`` (None: load their files)."""
        self.layer = layer
        for g in batches:
            t = tensors[g] if tensors is not None else None
            if tensors is not None:
                self._save(layer, g, t)
            if self.mode != "disk":
                t = t if t is not None else self._load(layer, g)
                self.data[g] = t.to(self.device if self.mode == "device" else "cpu")

    def get(self, g: int) -> torch.Tensor:
        """Input of the current layer for global batch ``g``, on the device."""
        t = self.data[g] if self.mode != "disk" else self._load(self.layer, g)
        return t.to(self.device)

    def put(self, g: int, t: torch.Tensor) -> None:
        """Output of the current layer for batch ``g`` (= input of the next layer)."""
        self._save(self.layer + 1, g, t)
        if self.mode != "disk":
            self.data[g] = t if self.mode == "device" else t.to("cpu")

    def advance(self) -> None:
        """Move on to the next layer (its inputs are what :meth:`put` stored)."""
        self.layer += 1

    def drop(self, layer: int) -> None:
        """Delete the files of ``layer``'s inputs (no longer needed once the next layer is committed)."""
        shutil.rmtree(self.directory / f"L{layer}", ignore_errors=True)
