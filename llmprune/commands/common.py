"""Arguments and checks shared by several subcommands.

Files a command writes are checked before any work (:func:`check_output_file`, :func:`recording_dir`), so a
long evaluation never ends in a failed write.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.evaluate.results import RESULTS_FILE, read_results
from llmprune.formats.output import nearest_existing, unwritable_reason

log = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser, *, positional_help: str) -> None:
    parser.add_argument("model", nargs="?", default=None, help=positional_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (checkpoint's; on a CPU, ppl/eval/generate run and "
                        "compress computes in float32), float32, float16, bfloat16")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the Hub (off by default)"
    )


def check_output_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    """A results file given by ``flag`` (``--json FILE``), checked before any work: not a directory, and
    writable: an existing file opens for writing, or the nearest existing directory above it accepts a new
    file (missing directories are created by :func:`write_output_file`).

    Raises:
        ConfigError: naming the flag, the path and why.
    """
    if path is None:
        return None
    if not str(path).strip():
        raise ConfigError(f"{flag}: empty file name")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if p.exists():
        try:
            with open(p, "a"):
                pass
        except OSError as exc:
            raise ConfigError(f"{flag} {path} is not writable ({exc.strerror or exc})") from None
        return p
    anc = nearest_existing(p.parent)
    if not anc.is_dir():
        raise ConfigError(f"{flag} {path}: {anc} is not a directory")
    reason = unwritable_reason(anc)
    if reason is not None:
        raise ConfigError(f"{flag} {path}: cannot create files in {anc} ({reason})")
    return p


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """A directory a command will write into (created if missing), checked before any work: it, or the
    nearest existing directory above it, accepts a new file.

    Raises:
        ConfigError: naming ``what``, the path and why.
    """
    p = Path(path).expanduser()
    anc = nearest_existing(p)
    if not anc.is_dir():
        raise ConfigError(f"{what} {path}: {anc} is not a directory")
    reason = unwritable_reason(anc)
    if reason is not None:
        raise ConfigError(f"{what} {path}: cannot create files in {anc} ({reason})")
    return p


def write_output_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (checked by :func:`check_output_file`), creating missing directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def recording_dir(directory: str | os.PathLike) -> bool:
    """Whether results can be merged into checkpoint ``directory``'s ``eval_results.json``, decided before any
    work: False (with one warning; the results are still printed) when the directory is not writable or its
    ``eval_results.json`` cannot be read."""
    d = Path(directory).expanduser()
    reason = unwritable_reason(d)
    if reason is None:
        try:
            read_results(d)
        except LlmpruneError as exc:
            reason = f"{exc}; fix or delete it"
    if reason is not None:
        log.warning("results will not be recorded in %s: %s", d / RESULTS_FILE, reason)
        return False
    return True


def check_recording_dir(directory: str | os.PathLike, flag: str) -> None:
    """Like :func:`recording_dir` for a directory the user named (``--baseline-of DIR``): an error instead."""
    d = Path(directory).expanduser()
    reason = unwritable_reason(d)
    if reason is not None:
        raise ConfigError(f"{flag} {directory}: cannot record results there ({reason})")
    try:
        read_results(d)
    except LlmpruneError as exc:
        raise ConfigError(f"{flag} {directory}: {exc}; fix or delete it") from None
