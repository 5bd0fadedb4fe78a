"""What a launcher needs to know about the GPU it launches on: SM count, architecture, shared-memory limit.

Launchers read these through :func:`device_info` (one place to stub for ahead-of-time compiles, see
``eval/kernel_compile.py``) and refuse, before launching, a config whose shared memory the architecture cannot
grant (:func:`check_shared`), with a message that says what to change.
"""

from __future__ import annotations

import functools

import torch

#: Opt-in shared memory per block (bytes) by compute capability (``major * 10 + minor``).
SMEM_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
               120: 99 * 1024}
#: The architecture non-CUDA devices (Triton's CPU interpreter) are checked against: a config refused there would
#: not run on an H100/H200 either.
DEFAULT_ARCH = 90
#: SM count assumed for non-CUDA devices (small, so the interpreter tests exercise split paths).
DEFAULT_SMS = 4


@functools.cache
def _cuda_info(index: int) -> tuple[int, int, int]:
    p = torch.cuda.get_device_properties(index)
    arch = p.major * 10 + p.minor
    optin = getattr(p, "shared_memory_per_block_optin", 0) or SMEM_LIMITS.get(arch, 99 * 1024)
    return p.multi_processor_count, arch, int(optin)


def device_info(device: torch.device) -> tuple[int, int]:
    """``(number of SMs, compute capability as major * 10 + minor)`` of ``device`` (defaults off CUDA)."""
    if device.type == "cuda":
        sms, arch, _ = _cuda_info(device.index if device.index is not None else torch.cuda.current_device())
        return sms, arch
    return DEFAULT_SMS, DEFAULT_ARCH


def smem_limit(arch: int) -> int:
    """Shared memory one block may use on ``arch`` (the device's own opt-in limit when it is the current one)."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            _, a, optin = _cuda_info(i)
            if a == arch:
                return optin
    return SMEM_LIMITS.get(arch, 99 * 1024)


def check_shared(kernel: str, need: int, arch: int, hint: str) -> None:
    """Raise ``ValueError`` (before any launch) if ``need`` bytes of shared memory exceed what ``arch`` grants."""
    limit = smem_limit(arch)
    if need > limit:
        raise ValueError(f"{kernel}: this config needs about {need // 1024} KB of shared memory per block, "
                         f"sm_{arch} grants {limit // 1024} KB; {hint}")


def check_keys_pow2(kernel: str, cfg: dict, keys, pow2_keys) -> dict:
    """Raise ``ValueError`` when ``cfg`` lacks one of ``keys`` or a ``pow2_keys`` entry is not a power of two.

    Returns:
        ``{key: cfg[key]}`` for ``pow2_keys`` (the launchers quote it in their later messages).
    """
    missing = [key for key in keys if key not in cfg]
    if missing:
        raise ValueError(f"{kernel} config lacks {missing}")
    pow2 = {key: cfg[key] for key in pow2_keys}
    if any(v < 1 or v & (v - 1) for v in pow2.values()):
        raise ValueError(f"{kernel} config: {pow2} must be powers of two")
    return pow2


#: Per-device arrival counters for kernels that finish a split reduction in the same launch (int32, all zero
#: between launches: the last program of each tile resets its own counter).
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``device``, reused across launches (kernels on one stream)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf
