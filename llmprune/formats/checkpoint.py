"""Saving checkpoints atomically, with pluggable on-disk formats.

A checkpoint is a normal Hugging Face folder (``config.json``, safetensors,
tokenizer) plus ``llmprune.json``: llmprune version, format, base model,
recipe, calibration and achieved sparsity. It is written to a temporary
sibling directory and swapped into place at the end (:mod:`llmprune.formats.output`),
so an interrupted save never leaves a half-written checkpoint.

Formats register a saver (and, when the plain transformers loader is not
enough, a loader) with :func:`register_format`; ``"dense"`` is the default and
loads with ``AutoModelForCausalLM.from_pretrained`` alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprune._registration import ensure_registered
from llmprune.errors import LlmpruneError
from llmprune.formats.output import METADATA_FILE, check_output, make_work_dir, move_into_place
from llmprune.formats.reading import read_json

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Format:
    name: str
    save: Callable[[Any, Path], None]
    load: Callable[..., Any] | None = None
    check: Callable[[Any], None] | None = None  # check(recipe): cheap validation before any work


_FORMATS: dict[str, Format] = {}


def register_format(
    name: str, *, load: Callable[..., Any] | None = None, check: Callable[[Any], None] | None = None
) -> Callable:
    """Register ``save(model, directory)`` for format ``name`` (decorator).

    ``load(directory, dtype=, device=)`` is used instead of plain transformers when given; ``check(recipe)``
    runs before any pruning work and raises :class:`~llmprune.errors.ConfigError` for recipes the format
    cannot store.
    """

    def deco(save: Callable[[Any, Path], None]) -> Callable:
        if name in _FORMATS:
            raise ValueError(f"format {name!r} registered twice")
        _FORMATS[name] = Format(name, save, load, check)
        return save

    return deco


def get_format(name: str) -> Format:
    ensure_registered()  # the built-ins register on first use (`import llmprune` stays light)
    try:
        return _FORMATS[name]
    except KeyError:
        raise LlmpruneError(f"unknown checkpoint format {name!r} (available: {', '.join(sorted(_FORMATS))})") from None


def available_formats() -> list[str]:
    ensure_registered()
    return sorted(_FORMATS)


def save_dense(model, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)


def read_metadata(directory: str | os.PathLike) -> dict | None:
    """``llmprune.json`` of ``directory`` (None when absent).

    Raises:
        LlmpruneError: naming the file, when it is not a UTF-8 JSON object or its ``format`` is not a string.
    """
    path = Path(directory) / METADATA_FILE
    meta = read_json(path, what=METADATA_FILE)
    if meta is not None and not isinstance(meta.get("format", "dense"), str):
        raise LlmpruneError(f"{path}: 'format' must be a string, got {meta['format']!r}")
    return meta


def load_checkpoint_format(directory: str, dtype, device):
    """Load with the checkpoint's own format loader, or None for plain transformers."""
    meta = read_metadata(directory) if Path(directory).is_dir() else None
    if not meta:
        return None
    fmt = get_format(meta.get("format", "dense"))
    if fmt.load is None:
        return None
    return fmt.load(directory, dtype=dtype, device=device)


def save_checkpoint(
    model,
    tokenizer,
    output: str | os.PathLike,
    *,
    metadata: dict,
    format: str = "dense",
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint atomically.

    Args:
        model: the (pruned) model.
        tokenizer: saved beside it (may be None).
        output: target directory; must not exist unless ``overwrite``.
        metadata: recorded in ``llmprune.json`` (``format`` is added).
        format: registered format name.
        overwrite: replace an existing directory.
        extra_files: name -> text content, written into the checkpoint.

    Returns:
        The final directory.
    """
    output = check_output(output, overwrite)
    fmt = get_format(format)
    tmp = make_work_dir(output)
    try:
        fmt.save(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {**metadata, "format": format}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint to %s", format, output)
    return output
