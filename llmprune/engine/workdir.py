"""The work directory of a streaming run (``<output>.partial/``): its layout, its lock, and what may be deleted.

Everything a streaming run writes goes under ``<output>.partial/`` (:class:`WorkDir`), except the calibration
activations when ``--offload-dir`` is given (``<offload-dir>/<output name>-<hash>.hidden``); what
``state.json`` records in it is :mod:`llmprune.engine.resume`'s.

Safety rules:

* Paths of the activations are relative: to ``<output>.partial`` (``{"base": "partial", "path": ...}``) or to
  the ``--offload-dir`` given (``{"base": "offload", ...}``), so a run resumes from any working directory;
  :func:`resolve_hidden` refuses one that does not resolve strictly inside its base.
* Nothing is deleted that the run did not create: the work directory is cleared entry by entry (only the names
  a run writes; anything else is an error), the activation directories file by file
  (:func:`~llmprune.engine.activations.remove_layer_files`).
* A running streaming output holds an exclusive ``flock`` on ``<output>.partial/lock`` (:class:`RunLock`); a
  second run on the same output fails at once with one error line. The lock goes with the process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmprune.engine.activations import is_own_hidden_dir, remove_layer_files
from llmprune.errors import LlmpruneError
from llmprune.formats.reading import inside

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "lock"
HIDDEN_BASES = ("partial", "offload")

#: What a streaming run writes directly under ``<output>.partial/`` (directories, files); a directory holding
#: anything else is not a run's work directory and is never cleared.
_OWN_DIRS = ("ckpt", "hidden", "offload")
_OWN_FILE = re.compile(r"calib\.pt|inputs-rank\d+\.pt|state\.json|state\.tmp|lock")


def _own_entry(p: Path) -> bool:
    if p.name in _OWN_DIRS:
        return p.is_dir() and not p.is_symlink()
    return bool(_OWN_FILE.fullmatch(p.name)) and (p.is_symlink() or p.is_file())


def _remove_entry(p: Path) -> None:
    """Delete one of the work directory's own entries (:func:`_own_entry`); symlinks are removed, not followed."""
    if p.name == "hidden":
        remove_layer_files(p)
    elif p.name in _OWN_DIRS:
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkDir:
    """``<output>.partial/``: the output shards (``ckpt/``), calibration ids, layer-0 inputs and the state."""

    root: Path

    @classmethod
    def of(cls, output: Path) -> WorkDir:
        """The work directory of ``output``."""
        return cls(output.with_name(output.name + ".partial"))

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def calib(self) -> Path:
        return self.root / "calib.pt"

    def inputs(self, rank: int) -> Path:
        """Layer-0 positional/keyword arguments of ``rank``'s batches (masks, rotary embeddings)."""
        return self.root / f"inputs-rank{rank}.pt"

    def hint(self) -> str:
        """The advice every error about a damaged work directory ends with."""
        return f"delete {self.root} to start over"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<output>.partial/lock`` for the lifetime of a streaming run.

    Being a ``flock``, it is released when the process exits, also on a crash or ``kill -9``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (the directory must exist).

        Raises:
            LlmpruneError: another process holds it, or the lock file cannot be opened.
        """
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise LlmpruneError(f"cannot open the run lock {self.path}: {exc.strerror}") from None
        if fcntl is None:  # pragma: no cover - not POSIX: no lock
            self.fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LlmpruneError(
                f"another llmprune run is writing {self.path.parent.name.removesuffix('.partial')} "
                f"(it holds {self.path}); wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hidden_spec(output: Path, offload_dir: str | os.PathLike | None) -> dict:
    """Where a fresh run keeps its activations, as recorded in ``state.json``.

    Under ``--offload-dir`` the directory is named after the output and a hash of its absolute path, so two
    outputs of the same name in different places never share it.
    """
    if offload_dir is None:
        return {"base": "partial", "path": "hidden"}
    digest = hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:10]
    return {"base": "offload", "path": f"{output.name}-{digest}.hidden"}


def _strictly_inside(base: Path, rel: str) -> Path | None:
    """``base / rel`` when ``rel`` is relative and resolves strictly inside ``base`` (symlinks followed), else None."""
    try:
        path = inside(base, rel, what="activations directory")
    except LlmpruneError:
        return None
    return None if path.resolve() == Path(base).resolve() else path


def resolve_hidden(work: WorkDir, spec: dict, offload_dir: str | os.PathLike | None) -> Path:
    """The activations' directory ``spec`` (from :func:`hidden_spec` or ``state.json``) points at.

    Raises:
        LlmpruneError: it needs an ``--offload-dir`` that was not given, or it does not resolve strictly inside
            its base.
    """
    if spec["base"] == "offload":
        if offload_dir is None:
            raise LlmpruneError(f"the interrupted run in {work.root} keeps its activations under --offload-dir; "
                                "pass the same --offload-dir again (or delete it to start over)")
        base = Path(offload_dir).expanduser()
    else:
        base = work.root
    path = _strictly_inside(base, spec["path"])
    if path is None:
        raise LlmpruneError(f"{work.state} names activations at {spec['path']!r}, outside {base}; refusing to use "
                            f"it; {work.hint()}")
    return path


def prepare_root(work: WorkDir) -> None:
    """Make sure the work directory is a real directory (created if missing)."""
    if work.root.is_symlink():
        raise LlmpruneError(f"{work.root} is a symbolic link; refusing to use it as a work directory")
    if work.root.exists() and not work.root.is_dir():
        raise LlmpruneError(f"{work.root} exists and is not a directory; move it away")
    work.root.mkdir(parents=True, exist_ok=True)


def clear_fresh(work: WorkDir) -> None:
    """Empty the work directory of what an earlier, never committed run wrote (the lock stays)."""
    foreign = sorted(p.name for p in work.root.iterdir() if not _own_entry(p))
    if foreign:
        raise LlmpruneError(f"{work.root} holds files llmprune did not write ({', '.join(foreign[:3])}); "
                            "move them away or delete the directory")
    for p in work.root.iterdir():
        if p.name != LOCK_FILE:
            _remove_entry(p)
    if (work.root / "hidden").exists():  # something in it that llmprune did not write
        raise LlmpruneError(f"{work.root / 'hidden'} holds files llmprune did not write; move them away")


def prepare_hidden(work: WorkDir, spec: dict, offload_dir: str | os.PathLike | None) -> None:
    """Rank 0, fresh start: the activations' directory is empty or holds only an earlier run's files (removed)."""
    path = resolve_hidden(work, spec, offload_dir)
    if path.is_symlink() or path.exists():
        if not is_own_hidden_dir(path):
            raise LlmpruneError(f"{path} exists and holds files llmprune did not write; move it away")
        remove_layer_files(path)


def finished_output(output: Path) -> bool:
    """True when a streaming run of ``output`` got as far as moving its checkpoint into place but no further:
    ``<output>.partial/state.json`` is left, its ``ckpt/`` is gone and ``output`` is a checkpoint."""
    work = WorkDir.of(output)
    return work.state.is_file() and not work.ckpt.exists() and (output / "llmprune.json").is_file()


def remove_work_dir(work: WorkDir, hidden_dir: Path | None) -> None:
    """Delete what a finished run leaves: the activations' files and the work directory's own entries.

    ``state.json`` goes first (a crash halfway leaves no state to resume from); foreign files stay.
    """
    if work.state.is_file():
        work.state.unlink()
    if hidden_dir is not None:
        remove_layer_files(hidden_dir)
    if not work.root.is_dir() or work.root.is_symlink():
        return
    for p in work.root.iterdir():
        if _own_entry(p):
            _remove_entry(p)
    try:
        work.root.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files llmprune did not write", work.root)
