"""File names and the small JSON sidecar of learned attention gates (``llmprune train-gates``).

Kept apart from the gate modules (:mod:`llmprune.runtime.gates.gate`, :mod:`llmprune.runtime.gates.files`) so
that model loading can resolve a gates-only directory (``attn_gates.json`` names its ``base_model``) without
importing the runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.formats.reading import read_json

GATES_FILE = "attn_gates.safetensors"
GATES_CONFIG = "attn_gates.json"


def has_gates(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds saved gate weights (``attn_gates.safetensors``)."""
    return (Path(directory).expanduser() / GATES_FILE).is_file()


def read_gates_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``attn_gates.json`` of ``directory`` (gate config + training info), or None when no gates are saved there.

    Raises:
        LlmpruneError: when the file is not a UTF-8 JSON object.
    """
    directory = Path(directory).expanduser()
    path = directory / GATES_CONFIG
    if not path.is_file() or not has_gates(directory):
        return None
    return read_json(path, what=GATES_CONFIG)


def gates_base_model(directory: str | os.PathLike) -> str | None:
    """For a gates-only directory (no ``config.json``), the base model it was trained on.

    Raises:
        LlmpruneError: when ``base_model`` is present but not a non-empty string.
    """
    meta = read_gates_meta(directory)
    base = meta.get("base_model") if meta else None
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise LlmpruneError(f"{Path(directory) / GATES_CONFIG}: 'base_model' must be a model name, got {base!r}")
    return base
