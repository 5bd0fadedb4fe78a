"""Local paths as the published checkpoint shows them: the Hub id of a base model, and the privacy rewrite.

The model card and the files :func:`llmprune.publish.hub.push` uploads name no local path. Absolute and
home-relative paths (the base model directory, the recorded command line, a calibration file, a gates directory)
are shown relative to the checkpoint's parent directory when they lie under it, else as a Hub id (when the
folder records one) or by their last component (:func:`public_path`, :func:`public_text`); paths already
recorded relative are kept. :func:`public_json` applies the same rewrite to a whole JSON document.
:func:`hub_base_model` gives the ``base_model`` metadata of the card (a Hub id, or None for a local path of no
known origin).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

# Local aliases -> the Hub id of the model they stand for (for base_model metadata).
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def _local_path(ref: str, directory: Path | None) -> Path | None:
    """``ref`` as an existing local path (relative ones: to the checkpoint, then to the cwd), or None."""
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [*([directory / path] if directory else []), path]
    return next((c for c in candidates if c.exists()), None)


def _recorded_hub_id(path: Path | None) -> str | None:
    """The Hub id a local model folder records as its origin (``config.json`` ``_name_or_path``), or None."""
    cfg = path / "config.json" if path is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text(encoding="utf-8")).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def hub_base_model(base: str | None, directory: Path | None = None) -> str | None:
    """A Hub id for ``base_model`` metadata, or None (local paths without a known origin)."""
    if not base or not isinstance(base, str):
        return None
    if base.lower() in HUB_IDS:
        return HUB_IDS[base.lower()]
    local = _local_path(base, Path(directory) if directory is not None else None)
    if local is not None or base.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:[\\/]", base):
        return _recorded_hub_id(local)
    return base if base.count("/") == 1 else None


# An absolute POSIX path, a home-relative one or a Windows drive path, quoted by shlex or bare; not part of
# a URL (``https://...``), a Hub id (``user/name``) or a ratio (``2/4``).
_QUOTED_PATH = re.compile(r"'((?:~|[A-Za-z]:)?[/\\][^']*)'")
_BARE_PATH = re.compile(r"(?<![\w.:/~\\-])((?:~|[A-Za-z]:)?[/\\][^\s'\"]*)")
# A path recorded relative to the checkpoint that climbs two or more levels (``../../home/me/x``).
_CLIMBING_PATH = re.compile(r"(?<![\w.:/~\\-])((?:\.\.[/\\]){2,}[^\s'\"]*)")


def public_path(ref: str, directory: str | os.PathLike | None = None) -> str:
    """A local path as the card shows it: under the checkpoint's parent directory, relative to that parent
    (``ckpt``, ``tiny-llama``); elsewhere the Hub id its ``config.json`` records, else its last component."""
    path = Path(ref).expanduser()
    if directory is not None:
        root = Path(directory).expanduser().resolve().parent
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            resolved = path
        if root != Path(root.anchor) and (resolved == root or root in resolved.parents):
            return os.path.relpath(resolved, root)
    return _recorded_hub_id(path) or re.split(r"[\\/]", str(ref).rstrip("/\\"))[-1] or "."


def public_text(text: str, directory: str | os.PathLike | None = None) -> str:
    """``text`` (a command line, a path, any string) with every absolute or ``~`` path, and every relative one
    that climbs two or more levels above the checkpoint (``../../x``), rewritten by :func:`public_path`; other
    relative paths, URLs and Hub ids are left as they are."""
    if not isinstance(text, str) or not any(c in text for c in "/\\"):
        return text

    def quoted(m: re.Match) -> str:
        return shlex.quote(public_path(m.group(1), directory))

    def bare(m: re.Match) -> str:
        return public_path(m.group(1), directory) if len(m.group(1)) > 1 else m.group(1)

    def climbing(m: re.Match) -> str:
        if directory is None:
            return Path(m.group(1)).name or m.group(1)
        return public_path(str(Path(directory).expanduser() / m.group(1)), directory)

    return _CLIMBING_PATH.sub(climbing, _BARE_PATH.sub(bare, _QUOTED_PATH.sub(quoted, text)))


def public_json(obj: Any, directory: str | os.PathLike | None = None) -> Any:
    """A JSON value with :func:`public_text` applied to every string (keys included)."""
    if isinstance(obj, dict):
        return {public_text(k, directory) if isinstance(k, str) else k: public_json(v, directory)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [public_json(v, directory) for v in obj]
    return public_text(obj, directory) if isinstance(obj, str) else obj
