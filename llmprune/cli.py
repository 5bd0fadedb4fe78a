"""``llmprune`` command line: a thin wrapper over the Python API.

Subcommands live in :mod:`llmprune.commands`, one module each, listed
explicitly in :data:`COMMANDS`; each module defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.

Every user error (:class:`~llmprune.errors.LlmpruneError`, bad flags) prints
one line ``llmprune: error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmprune._version import __version__
from llmprune.commands import bench as _bench
from llmprune.commands import compress as _compress
from llmprune.commands import convert as _convert
from llmprune.commands import eval as _eval
from llmprune.commands import generate as _generate
from llmprune.commands import ppl as _ppl
from llmprune.commands import push as _push
from llmprune.commands import train_gates as _train_gates
from llmprune.errors import LlmpruneError

COMMANDS = (_compress, _ppl, _eval, _bench, _push, _convert, _train_gates, _generate)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"llmprune: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``llmprune`` parser with one subparser per module in :data:`COMMANDS`."""
    parser = _Parser(prog="llmprune", description="Post-training compression for LLMs.")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in COMMANDS:
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present in practice
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, bad flags: keep main() returning a code
        return int(exc.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    try:
        return int(args._run(args) or 0)
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
