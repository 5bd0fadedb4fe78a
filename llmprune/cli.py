"""``llmprune`` command line: a thin wrapper over the Python API.

Subcommands live in :mod:`llmprune.commands`, one module each, listed
explicitly in :data:`COMMANDS`; each module defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.

Every bad input ends in one line on stderr, never a traceback (``-v`` adds the traceback):

* a user error (:class:`~llmprune.errors.LlmpruneError`, bad flags), a path the system refuses
  (``OSError``: permission denied, not found, read-only filesystem, disk full ...) or a Hugging Face Hub
  that cannot be reached: ``llmprune: error: ...``, exit code 2;
* Ctrl-C: ``llmprune: interrupted``, exit code 130;
* anything else is a bug: ``llmprune: internal error: <type>: <message> (rerun with -v for the traceback)``,
  exit code 3.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
import traceback
import warnings

from llmprune._version import __version__
from llmprune.commands import bench as _bench
from llmprune.commands import calibrate_act as _calibrate_act
from llmprune.commands import calibrate_kv as _calibrate_kv
from llmprune.commands import card as _card
from llmprune.commands import completion as _completion
from llmprune.commands import compress as _compress
from llmprune.commands import convert as _convert
from llmprune.commands import env as _env
from llmprune.commands import eval as _eval
from llmprune.commands import generate as _generate
from llmprune.commands import info as _info
from llmprune.commands import ppl as _ppl
from llmprune.commands import push as _push
from llmprune.commands import recipes as _recipes
from llmprune.commands import train_gates as _train_gates
from llmprune.errors import LlmpruneError

COMMANDS = (_compress, _ppl, _eval, _bench, _push, _convert, _train_gates, _generate, _calibrate_kv,
            _calibrate_act, _info, _card, _recipes, _env, _completion)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"llmprune: error: {message}", file=sys.stderr)
        sys.exit(2)


def _command_name(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (the first word; the top-level options take no values), or None."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in {mod.NAME for mod in COMMANDS} else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``llmprune`` parser with one subparser per module in :data:`COMMANDS`.

    ``only``: add the arguments of that subcommand alone (the others keep their name and help), so that
    ``llmprune --help`` and ``llmprune CMD ...`` build no more than they need (some arguments import torch).
    """
    parser = _Parser(prog="llmprune", description="Post-training compression for LLMs.")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in COMMANDS:
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument("-q", "--quiet", action="store_true",
                       help="only llmprune's warnings and the final summary (no progress bars, no library warnings)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
        if only is None or mod.NAME == only:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _build_parser=build_parser)  # `completion` reads the full parser
    return parser


#: libraries whose log records and Python warnings ``-q`` silences (llmprune's own warnings still show)
_THIRD_PARTY_LOGGERS = ("transformers", "torch", "accelerate", "datasets", "huggingface_hub", "lm_eval", "urllib3")


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    if quiet and not verbose:  # library warnings (FutureWarning, UserWarning ...) are noise for a user of the CLI
        warnings.filterwarnings("ignore")
        for name in _THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("llmprune").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present in practice
        pass


def _logs_above_bars():
    """Log lines printed through tqdm (above the progress bars, not through them) while a command runs; only
    when the root logger prints to the console (a host application's own logging is left alone)."""
    console = any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
                  for h in logging.getLogger().handlers)
    if not console:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _one_line(text: object, limit: int = 500) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters (terminal colour codes removed)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text)).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _os_error_message(exc: OSError) -> str:
    """``PATH: reason`` for an ``OSError`` (the paths it names, its ``strerror``)."""
    reason = exc.strerror or _one_line(exc) or type(exc).__name__
    paths = [os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else str(p)
             for p in (exc.filename, exc.filename2) if p is not None]
    if exc.errno == errno.EROFS:
        reason = "read-only file system"
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def error_message(exc: BaseException) -> tuple[str, int]:
    """The one stderr line and the exit code for an exception that ended a command (see the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return "llmprune: interrupted", EXIT_INTERRUPTED
    if isinstance(exc, LlmpruneError):
        return f"llmprune: error: {_one_line(exc)}", EXIT_USER_ERROR
    from llmprune.publish.hub import hub_error_message  # here: the CLI answers --help without its imports

    hub = hub_error_message(exc)
    if hub is not None:
        return f"llmprune: error: {_one_line(hub)}", EXIT_USER_ERROR
    if isinstance(exc, OSError):
        return f"llmprune: error: {_one_line(_os_error_message(exc))}", EXIT_USER_ERROR
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return f"llmprune: error: out of memory: {_one_line(exc) or 'allocation failed'} (try a smaller --batch-size " \
               "or --seqlen, or another --device)", EXIT_USER_ERROR
    msg = _one_line(exc)
    return (f"llmprune: internal error: {type(exc).__name__}{': ' + msg if msg else ''} "
            "(rerun with -v for the traceback)"), EXIT_INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 3 internal error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_name(argv) or "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, bad flags: keep main() returning a code
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    verbose = bool(getattr(args, "verbose", False))
    from llmprune.model.network import allow_process_offline

    allow_process_offline()  # a CLI run may switch its own process to offline mode when the Hub is unreachable
    try:
        with warnings.catch_warnings():  # -q's filters end with the command (main() may run in-process)
            _setup_logging(args.quiet, verbose)
            with _logs_above_bars():
                return int(args._run(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit (a command's own exit code) passes through
        line, code = error_message(exc)
        if verbose and not isinstance(exc, KeyboardInterrupt):
            traceback.print_exc(file=sys.stderr)
        print(line, file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
