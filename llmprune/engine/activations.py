"""Calibration activations of the streaming engine: the hidden states entering the current decoder layer.

They are the largest state besides one layer's weights: kept on the device while they fit the budget, else in
CPU RAM while they fit half of what is available, else only on disk (:func:`store_mode`). In every mode the
states at each layer boundary are also saved as files, which is what ``--resume`` restarts from.

:func:`activation_bytes` estimates their size before any work, and :func:`check_activation_memory` refuses a run
whose activations cannot fit anywhere they may go.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmprune.errors import ConfigError, LlmpruneError

log = logging.getLogger(__name__)

#: Share of the GPU's memory the activations may take when no budget is given.
DEVICE_SHARE = 0.3
#: Share of the available RAM the activations may take in CPU RAM before they go to disk.
RAM_SHARE = 0.5

_LAYER_DIR = re.compile(r"L\d+")
_BATCH_FILE = re.compile(r"b\d+\.(safetensors|tmp)")


def available_ram() -> int:
    """Bytes of RAM available now (``MemAvailable``; a huge number where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


def activation_bytes(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the hidden states at one layer boundary: ``nsamples * seqlen * hidden * bytes(dtype)``."""
    return nsamples * seqlen * hidden * torch.empty((), dtype=dtype).element_size()


def describe_activations(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype) -> str:
    """``"1.50 GiB (nsamples 128 x seqlen 2048 x hidden 576 x 4 bytes)"``."""
    size = torch.empty((), dtype=dtype).element_size()
    return (f"{_gib(activation_bytes(nsamples, seqlen, hidden, dtype))} "
            f"(nsamples {nsamples} x seqlen {seqlen} x hidden {hidden} x {size} bytes)")


def check_activation_memory(
    nsamples: int,
    seqlen: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    device: torch.device,
    streaming: bool,
    reserved: int = 0,
    disk_dir: Path | None = None,
) -> int:
    """Log the calibration activations' size; refuse a run they cannot fit. Returns the estimate in bytes.

    Args:
        nsamples, seqlen, hidden, dtype: what the size is made of (``seqlen`` as clipped to the model).
        device: where the layers run. In memory (``streaming=False``) the activations live there: the GPU's
            memory on CUDA, the available RAM (less ``reserved``, the model's weights) on CPU.
        streaming: the streaming engine can keep them on disk, so only the free space of ``disk_dir`` bounds
            them (twice the estimate: the inputs and outputs of one layer are on disk at once).
        reserved: bytes of RAM the run needs besides the activations (the in-memory model's weights).
        disk_dir: where the streaming engine's activation files go (its nearest existing ancestor is measured).

    Raises:
        ConfigError: the activations fit nowhere they may go, naming the numbers.
    """
    what = describe_activations(nsamples, seqlen, hidden, dtype)
    nbytes = activation_bytes(nsamples, seqlen, hidden, dtype)
    log.info("calibration activations: %s per layer boundary", what)
    hint = "lower --nsamples/--seqlen"
    if streaming:
        if disk_dir is None:
            return nbytes
        anc = Path(disk_dir)
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        try:
            free = shutil.disk_usage(anc).free
        except OSError:
            return nbytes
        if 2 * nbytes > free:
            raise ConfigError(f"calibration activations need {what}, twice that on disk between layers, but "
                              f"{anc} has only {_gib(free)} free; {hint} or choose another --offload-dir")
        return nbytes
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if nbytes > total:
            raise ConfigError(f"calibration activations need {what} but {device} has {_gib(total)}; {hint} or "
                              "use --low-memory (streams them through CPU RAM or disk)")
        return nbytes
    ram = available_ram()
    if nbytes + reserved > ram:
        extra = f" besides the model's {_gib(reserved)}" if reserved else ""
        raise ConfigError(f"calibration activations need {what}{extra} but only {_gib(ram)} of RAM is available; "
                          f"{hint} or use --low-memory (keeps them on disk)")
    return nbytes


def store_mode(nbytes: int, device: torch.device, budget: int | None, ram: int | None = None) -> str:
    """Where ``nbytes`` of activations live: ``"device"``, ``"cpu"`` or ``"disk"``.

    Args:
        nbytes: size of this rank's hidden states at one layer boundary.
        device: where the layers run.
        budget: bytes allowed on the device (CUDA) or in RAM (CPU runs); None: 30% of the GPU's memory on
            CUDA, half the available RAM on CPU.
        ram: bytes of RAM available (None: measured now). Beyond half of it the states go to disk.
    """
    ram_ok = nbytes <= RAM_SHARE * (available_ram() if ram is None else ram)
    if device.type == "cuda":
        if budget is None:
            budget = int(DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory)
        if nbytes <= budget:
            return "device"
        return "cpu" if ram_ok else "disk"
    if budget is None:
        return "cpu" if ram_ok else "disk"
    return "cpu" if nbytes <= budget and ram_ok else "disk"


def remove_layer_files(directory: Path) -> None:
    """Delete what :class:`HiddenStore` writes under ``directory`` (``L<i>/b<g>.safetensors``), and nothing else.

    Directories left empty are removed; anything else found there is left in place (with a warning).
    """
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return
    foreign = []
    for layer in directory.iterdir():
        if not _LAYER_DIR.fullmatch(layer.name) or layer.is_symlink() or not layer.is_dir():
            foreign.append(layer)
            continue
        _remove_batches(layer, foreign)
    try:
        directory.rmdir()
    except OSError:
        pass
    if foreign:
        log.warning("left %s in place: not written by llmprune (e.g. %s)", directory, foreign[0].name)


def _remove_batches(layer: Path, foreign: list[Path]) -> None:
    # Every rank of a multi-process run drops the same shared layer directory, so files (or the directory
    # itself) may vanish under us: that is fine, they were ours to delete anyway.
    try:
        entries = list(layer.iterdir())
    except FileNotFoundError:
        return
    for f in entries:
        if _BATCH_FILE.fullmatch(f.name) and (f.is_symlink() or f.is_file()):
            f.unlink(missing_ok=True)
        elif f.exists() or f.is_symlink():
            foreign.append(f)
    try:
        layer.rmdir()
    except OSError:
        pass


def is_own_hidden_dir(directory: Path) -> bool:
    """True when everything under ``directory`` is what :class:`HiddenStore` writes (or it is empty)."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    for layer in directory.iterdir():
        if not _LAYER_DIR.fullmatch(layer.name) or layer.is_symlink() or not layer.is_dir():
            return False
        if not all(_BATCH_FILE.fullmatch(f.name) for f in layer.iterdir()):
            return False
    return True


class HiddenStore:
    """Hidden states (``[b, s, hidden]`` per batch) of this rank's calibration batches at the current layer.

    Mode ``device``/``cpu``: kept in memory there. Mode ``disk``: only in the per-layer files (loaded one batch
    at a time). In every mode the states at each layer boundary are also saved as ``L{layer}/b{batch}`` files
    (what ``--resume`` restarts from). Files read back are checked against ``shapes`` (batch -> shape, None
    for any size of a dimension; learned from :meth:`add`) and ``dtype`` when given, so a damaged or foreign
    file is one clear error.
    """

    def __init__(self, mode: str, device: torch.device, directory: Path,
                 shapes: dict[int, tuple] | None = None, dtype: torch.dtype | None = None) -> None:
        self.mode, self.device, self.directory = mode, device, Path(directory)
        self.shapes, self.dtype = shapes or {}, dtype
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
        path = self._file(layer, g)
        hint = "delete the .partial directory (and the activations under --offload-dir) to start over"
        try:
            with safe_open(path, framework="pt") as f:
                t = f.get_tensor("hidden")
        except FileNotFoundError:
            raise LlmpruneError(f"activations of the interrupted run are missing ({path}); {hint}") from None
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise LlmpruneError(f"activations file {path} is unreadable ({exc}); {hint}") from None
        want = self.shapes.get(g)
        shape_ok = want is None or (t.dim() == len(want) and all(w is None or w == a for w, a in zip(want, t.shape)))
        if not shape_ok or (self.dtype is not None and t.dtype != self.dtype):
            expected = "x".join("?" if w is None else str(w) for w in want) if want else "?"
            raise LlmpruneError(f"activations file {path} holds {t.dtype} {list(t.shape)}, expected "
                                f"{self.dtype or 'any dtype'} [{expected}]; {hint}")
        return t

    def add(self, layer: int, g: int, t: torch.Tensor) -> None:
        """Start batch ``g`` at ``layer`` with states ``t`` (saved as that layer's input file)."""
        self.layer = layer
        self.shapes[g] = tuple(t.shape)
        self._save(layer, g, t)
        if self.mode != "disk":
            self.data[g] = t.to(self.device if self.mode == "device" else "cpu")

    def init(self, layer: int, tensors: dict[int, torch.Tensor] | None, batches: list[int]) -> None:
        """Start at ``layer`` with the given states of global batches ``batches`` (None: load their files)."""
        self.layer = layer
        for g in batches:
            if tensors is not None:
                self.add(layer, g, tensors[g])
            elif self.mode != "disk":
                self.data[g] = self._load(layer, g).to(self.device if self.mode == "device" else "cpu")
            else:
                self._load(layer, g)  # checked now rather than in the middle of the layer

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
        d = self.directory / f"L{layer}"
        if d.is_dir() and not d.is_symlink():
            foreign: list[Path] = []
            _remove_batches(d, foreign)


def batch_shapes(n_rows: int, batch_size: int, batches: list[int], tail: tuple) -> dict[int, tuple]:
    """``{batch: (rows, *tail)}`` of global batches ``batches`` of ``n_rows`` sequences cut by ``batch_size``."""
    return {g: (min(batch_size, n_rows - g * batch_size), *tail) for g in batches}
