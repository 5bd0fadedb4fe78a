"""Device resolution and moving modules / nested tensor containers between devices."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmprune.errors import ConfigError

#: Device types a model can run on, and how to tell whether this machine has one.
_RUNNABLE = {
    "cpu": lambda: True,
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
}
_COUNT = {"cuda": lambda: torch.cuda.device_count(), "xpu": lambda: torch.xpu.device_count()}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; a bad or unavailable device is a ConfigError.

    Only devices a model can run on are accepted (``cpu``, ``cuda[:N]``, ``mps``, ``xpu[:N]``); ``meta`` (no
    data) and the other torch device types are refused, as is an index beyond the devices present.
    """
    if device is None or str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ConfigError(f"invalid device {device!r} (expected cpu, cuda, cuda:N, mps or xpu)")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"invalid device {device!r} (expected cpu, cuda, cuda:N, mps or xpu)") from None
    if dev.type not in _RUNNABLE:
        raise ConfigError(f"device {device!r} cannot run a model (use cpu, cuda, cuda:N, mps or xpu)")
    if not _RUNNABLE[dev.type]():
        what = "CUDA" if dev.type == "cuda" else dev.type.upper()
        raise ConfigError(f"device {device!r} requested but {what} is not available")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ConfigError(f"invalid device {device!r}: the CPU has no index {dev.index} (use cpu)")
    if dev.index is not None and dev.type in _COUNT:
        n = _COUNT[dev.type]()
        if dev.index >= n:
            raise ConfigError(f"device {device!r} requested but only {n} {dev.type.upper()} device(s) are visible "
                              f"(indices 0..{n - 1})")
    return dev


def module_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (or buffer); CPU for a module with neither."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Temporarily move modules to ``device``, restoring their devices afterwards."""
    homes = [module_device(m) for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


def to_device(obj, device: torch.device):
    """``obj`` with every tensor inside (nested tuples / lists / dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
