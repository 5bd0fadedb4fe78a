"""The one rule for "run the Triton kernel, or plain torch?", shared by every inference feature.

Each feature (``Sparse24Linear``, ``BitmapKVCache``, ``GateRuntime``) takes a requested *backend*:

* ``"auto"`` (default): the Triton kernel on CUDA tensors, torch everywhere else;
* ``"triton"``: as ``auto``, and also on CPU when Triton's interpreter is on (``TRITON_INTERPRET=1``; tests);
* ``"torch"``: never the kernel.

:func:`use_kernel` applies that rule to a device; the feature then adds its own shape limits (the constants
below, the only copies) and the kernel launchers validate their arguments as usual.
"""

from __future__ import annotations

import os

import torch

from llmprune.errors import ConfigError

#: The accepted backend requests.
BACKENDS = ("auto", "triton", "torch")

#: ``Sparse24Linear`` runs the kernel for at most this many input rows; above it the op is compute bound and
#: unpack + ``F.linear`` (cuBLAS, prefill) wins.
SPARSE24_MAX_ROWS = 16
#: ``BitmapKVCache`` runs the decode kernel for at most this many new query tokens per step (the kernel keeps
#: all ``G * M`` query rows of a KV head in one register tile); longer steps go to the torch path.
KV_BITMAP_MAX_QUERIES = 16
#: Gated attention runs the kernel for decode steps of exactly this many query tokens (the kernel takes one).
GATED_DECODE_QUERIES = 1
#: Activation-sparse linears run the input-sparse GEMV for at most this many input rows (decode, a few sequences);
#: above it the kept-input union is no longer sparse and cuBLAS wins.
ACT_SPARSE_MAX_ROWS = 4


def interpreter_enabled() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(requested: str) -> str:
    """``requested`` if it is one of :data:`BACKENDS`.

    Raises:
        ConfigError: otherwise.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"backend must be auto, triton or torch, got {requested!r}")
    return requested


def backend_from_flag(flag: bool | None) -> str:
    """The backend named by an older ``use_kernel`` flag: ``None`` auto, ``True`` triton, ``False`` torch."""
    return "auto" if flag is None else "triton" if flag else "torch"


def use_kernel(device: torch.device | str, *, requested: str = "auto") -> bool:
    """Whether a Triton kernel should run on ``device`` for the backend ``requested`` (rule: module doc).

    Raises:
        ConfigError: if ``requested`` is not one of :data:`BACKENDS`.
    """
    check_backend(requested)
    if requested == "torch":
        return False
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind == "cuda":
        return True
    return requested == "triton" and interpreter_enabled()
