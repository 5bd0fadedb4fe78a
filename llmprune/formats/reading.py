"""The one reading layer: every JSON, safetensors and torch file llmprune reads goes through here.

Reading verifies instead of trusting: a file that is missing, truncated, garbled or names something outside
its checkpoint gives one :class:`~llmprune.errors.LlmpruneError` naming the file, never a traceback from the
library underneath (``json``, ``safetensors``, ``pickle``). This module reads JSON, torch pickles and index
paths; safetensors files and whole checkpoint folders are read by :mod:`llmprune.formats.safetensors_io`.

* :func:`read_json`: a JSON file whose top level has the expected type.
* :func:`load_torch`: ``torch.load(..., weights_only=True)``; pickles it refuses are errors.
* :func:`inside`: a file name taken from an index, refused when it leads outside its directory.
* :func:`index_weight_map`: tensor name -> shard path of a sharded checkpoint's ``*.index.json``.
* :func:`preview` / :func:`first_line`: the short forms one-line errors are made of.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError

_TYPE_NAMES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _type_name(t: type) -> str:
    return _TYPE_NAMES.get(t, t.__name__)


def read_json(path: str | os.PathLike, *, what: str | None = None, expect: type | None = dict,
              required: bool = False) -> Any:
    """The parsed JSON file ``path``.

    Args:
        path: the file.
        what: what the file is, for messages (default: its name).
        expect: the type the top level must have (None: any).
        required: a missing file is an error (else None is returned).

    Raises:
        LlmpruneError: naming the file, when it is missing (``required``), unreadable, not UTF-8, not JSON,
            or its top level is not ``expect``.
    """
    path = Path(path)
    label = f"{what} {path}" if what and what != path.name else str(path)
    if not path.is_file():
        if required or path.exists():
            raise LlmpruneError(f"{label}: {'not a file' if path.exists() else 'file not found'}")
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LlmpruneError(f"{label}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LlmpruneError(f"{label} is not a UTF-8 text file (binary or corrupt)") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise LlmpruneError(f"{label} is not valid JSON: {detail}") from None
    if expect is not None and not isinstance(data, expect):
        found = _type_name(type(data))
        raise LlmpruneError(f"{label} must hold a JSON {_type_name(expect)}, not {'an' if found[0] in 'aeiou' else 'a'} {found}")
    return data


# ------------------------------------------------------------------------------------------------ paths


def _hub_repo_root(directory: Path) -> Path | None:
    """For a Hugging Face cache snapshot (``models--x--y/snapshots/<rev>``), the repo folder (its files are
    symlinks into ``models--x--y/blobs``)."""
    parent = directory.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(("models--", "datasets--")):
        return parent.parent
    return None


def inside(directory: str | os.PathLike, relative: str, *, what: str = "file") -> Path:
    """``directory / relative`` for a file name read from a file (an index), refused when it leaves ``directory``.

    Refused: non-strings, empty names, absolute paths, ``..`` components, and names whose resolved location
    (after symlinks) is outside ``directory`` (for a Hugging Face cache snapshot, outside its repo folder,
    whose ``blobs`` the snapshot links to).

    Raises:
        LlmpruneError: naming the offending name.
    """
    directory = Path(directory)
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise LlmpruneError(f"{directory}: invalid {what} name {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ".." in rel.parts or ".." in relative.split("\\"):
        raise LlmpruneError(f"{directory}: {what} {relative!r} points outside the checkpoint directory")
    target = directory / rel
    root = directory.resolve()
    allowed = [root]
    repo = _hub_repo_root(directory.absolute())
    if repo is not None:
        allowed.append(repo.resolve())
    resolved = target.resolve()
    if not any(resolved == a or a in resolved.parents for a in allowed):
        raise LlmpruneError(f"{directory}: {what} {relative!r} resolves outside the checkpoint directory")
    return target


def index_weight_map(index: str | os.PathLike) -> dict[str, Path]:
    """``weight_map`` of a sharded-checkpoint index (``*.index.json``): tensor name -> shard path.

    Raises:
        LlmpruneError: when the index is not JSON, has no ``weight_map`` object of name -> file name, or names
            a file outside its directory.
    """
    index = Path(index)
    data = read_json(index, required=True)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise LlmpruneError(f"{index}: no 'weight_map' object (tensor name -> file)")
    out: dict[str, Path] = {}
    resolved: dict[str, Path] = {}
    for key, fname in wm.items():
        if not isinstance(fname, str):
            raise LlmpruneError(f"{index}: weight_map[{key!r}] is {fname!r}, not a file name")
        if fname not in resolved:
            resolved[fname] = inside(index.parent, fname, what="shard")
        out[key] = resolved[fname]
    return out


# ---------------------------------------------------------------------------------------------- torch


def load_torch(path: str | os.PathLike, **kwargs) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``: a pickle that is not plain tensors/containers, or a
    corrupt file, is a :class:`LlmpruneError` naming the file."""
    import pickle

    import torch  # here, not at the top: the JSON readers also serve the CLI's light modules (fast --help)

    path = Path(path)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise LlmpruneError(f"{path}: file not found") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = f" (it calls {found.group(1)})" if found else ""
        raise LlmpruneError(
            f"{path}: refused: not a pickle of plain tensors{detail} (torch.load with weights_only=True rejects it)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, KeyError, TypeError,
            IndexError, UnicodeDecodeError, struct.error) as exc:
        raise LlmpruneError(f"{path}: not a readable torch file: {first_line(exc)}") from None


# --------------------------------------------------------------------------------------------- messages


def preview(keys, what: str = "tensor") -> str:
    """``"tensor a"`` or ``"3 tensors: a, b, c"`` / ``"5 tensors: a, b, c (and 2 more)"``, for messages."""
    keys = list(keys)
    if len(keys) == 1:
        return f"{what} {keys[0]}"
    shown = ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    return f"{len(keys)} {what}s: {shown}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters, terminal escapes removed), for
    one-line errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:  # "validation error for field 'x':" + the reason on the next line
        line = f"{line} {lines[1]}"
    if len(line) > 160 and ". " in line[:300]:  # long library messages: their first sentence
        line = line[: line.index(". ")]
    return line[:300]
