"""One ``--json [FILE]`` spelling for every command that has a result: JSON on stdout, or written to FILE.

``--json`` alone prints the result as one JSON document on stdout and moves the human-readable text to stderr
(so ``llmprune info DIR --json | jq .`` works); ``--json FILE`` writes the document to FILE (checked before any
work, :func:`llmprune.commands.common.check_output_file`) and keeps the text on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from llmprune.commands.common import check_output_file, write_output_file

#: ``--json`` given without a file: the document goes to stdout.
STDOUT = "-"


def add_json_argument(parser: argparse.ArgumentParser, what: str = "the result", *aliases: str) -> None:
    """Add ``--json [FILE]`` (``aliases``: older spellings kept working, e.g. ``--output``) as ``args.json``."""
    parser.add_argument("--json", *aliases, dest="json", nargs="?", const=STDOUT, default=None, metavar="FILE",
                        help=f"print {what} as JSON on stdout (text then goes to stderr), or write it to FILE")


def json_target(args: argparse.Namespace) -> str | Path | None:
    """``args.json`` checked before any work: None, :data:`STDOUT`, or a writable file path."""
    value = getattr(args, "json", None)
    if value is None or value == STDOUT:
        return value
    return check_output_file(value, "--json")


def text_stream(args: argparse.Namespace) -> TextIO:
    """Where the human-readable text goes: stderr while the JSON document takes stdout, else stdout."""
    return sys.stderr if getattr(args, "json", None) == STDOUT else sys.stdout


def emit_json(target: str | Path | None, document: Any) -> None:
    """Write ``document`` to ``target`` (from :func:`json_target`); None: nothing."""
    if target is None:
        return
    text = json.dumps(document, indent=2, default=str) + "\n"
    if target == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_output_file(Path(target), text)
