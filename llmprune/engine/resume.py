"""Resuming an interrupted streaming run: the work directory, its lock, ``state.json`` and the resume-or-start
decision.

Everything a streaming run writes goes under ``<output>.partial/`` (:class:`WorkDir`), except the calibration
activations when ``--offload-dir`` is given (``<offload-dir>/<output name>-<hash>.hidden``). After each finished
layer :func:`commit` atomically rewrites ``state.json`` (:class:`RunState`: the next layer, the reports so far,
the calibration config, where the activations live); a run started again with ``resume`` continues from
there, provided its :func:`fingerprint` (model, recipe, dtype, world size, reduction, shard size) matches.

Safety rules:

* ``state.json`` is input like any other: :meth:`RunState.from_json` checks its shape and types, and a garbled
  or tampered file is one :class:`~llmprune.errors.LlmpruneError` suggesting to delete the ``.partial``
  directory. Paths in it are relative: to ``<output>.partial`` (``{"base": "partial", "path": ...}``) or to
  the ``--offload-dir`` given (``{"base": "offload", ...}``), so a run resumes from any working directory;
  :func:`resolve_hidden` refuses one that does not resolve strictly inside its base.
* Nothing is deleted that the run did not create: the work directory is cleared entry by entry (only the names
  a run writes; anything else is an error), the activation directories file by file
  (:func:`~llmprune.engine.activations.remove_layer_files`).
* A running streaming output holds an exclusive ``flock`` on ``<output>.partial/lock`` (:class:`RunLock`); a
  second run on the same output fails at once with one error line. The lock goes with the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprune._version import __version__
from llmprune.calibration.distributed import DistContext, broadcast_object
from llmprune.config import CalibConfig, Recipe, build
from llmprune.engine.activations import is_own_hidden_dir, remove_layer_files
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.reading import inside, read_json
from llmprune.prune.report import ModuleReport

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "lock"
STATE_VERSION = 2
STORE_MODES = ("device", "cpu", "disk")
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


@dataclass
class RunState:
    """What ``state.json`` records of a streaming run.

    Attributes:
        fingerprint: the run's :func:`fingerprint`.
        n_layers: decoder layers of the model.
        next_layer: the first layer not committed yet.
        reports: the reports of the committed layers.
        seconds: pruning time so far.
        calibration: the calibration config used (``CalibConfig.to_dict()``; a local source file recorded
            relative to the work directory), None without calibration.
        store: the activations' :func:`~llmprune.engine.activations.store_mode` (None without calibration).
        hidden: where the activations' files are: ``{"base": "partial" | "offload", "path": relative path}``.
    """

    fingerprint: str
    n_layers: int
    next_layer: int = 0
    reports: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict | None = None
    store: str | None = None
    hidden: dict | None = None

    def to_json(self) -> dict:
        return {
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "next_layer": self.next_layer,
            "n_layers": self.n_layers, "reports": [dataclasses.asdict(r) for r in self.reports],
            "seconds": self.seconds, "calibration": self.calibration, "store": self.store,
            "hidden": self.hidden,
        }

    @classmethod
    def from_json(cls, d: Any, where: str = STATE_FILE, hint: str = "delete the .partial directory") -> RunState:
        """Parse and check a ``state.json`` document.

        Raises:
            LlmpruneError: naming the first bad field, ending with ``hint``.
        """

        def bad(msg: str) -> LlmpruneError:
            return LlmpruneError(f"{where} is not a valid llmprune run state ({msg}); {hint}")

        if not isinstance(d, dict):
            raise bad(f"expected an object, got {type(d).__name__}")
        expected = {"version", "fingerprint", "next_layer", "n_layers", "reports", "seconds", "calibration",
                    "store", "hidden"}
        if d.get("version") != STATE_VERSION:
            raise bad(f"version {d.get('version')!r}, this llmprune writes {STATE_VERSION}")
        if set(d) != expected:
            extra, missing = sorted(set(d) - expected), sorted(expected - set(d))
            raise bad(f"unexpected keys {extra}" if extra else f"missing keys {missing}")
        fp = d["fingerprint"]
        if not (isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp)):
            raise bad("fingerprint is not a sha256 hex digest")
        n_layers, next_layer = _int(d["n_layers"]), _int(d["next_layer"])
        if n_layers is None or n_layers < 1:
            raise bad(f"n_layers {d['n_layers']!r}")
        if next_layer is None or not 0 <= next_layer <= n_layers:
            raise bad(f"next_layer {d['next_layer']!r} (the model has {n_layers} layers)")
        seconds = d["seconds"]
        if not _number(seconds) or seconds < 0:
            raise bad(f"seconds {seconds!r}")
        if not isinstance(d["reports"], list):
            raise bad("reports is not a list")
        reports = []
        for i, r in enumerate(d["reports"]):
            rep = _report(r)
            if rep is None:
                raise bad(f"reports[{i}] is not a module report")
            reports.append(rep)
        cal = d["calibration"]
        if cal is not None:
            try:
                build(CalibConfig, cal, "calibration")
            except ConfigError as exc:
                raise bad(str(exc)) from None
        store, hidden = d["store"], d["hidden"]
        if store is not None and store not in STORE_MODES:
            raise bad(f"store {store!r}")
        if (store is None) != (cal is None):
            raise bad("store and calibration must both be set or both be null")
        if store is not None:
            if not (isinstance(hidden, dict) and set(hidden) == {"base", "path"} and hidden["base"] in HIDDEN_BASES
                    and isinstance(hidden["path"], str) and hidden["path"]):
                raise bad(f"hidden {hidden!r}")
        elif hidden is not None:
            raise bad("hidden without calibration")
        return cls(fp, n_layers, next_layer, reports, float(seconds), cal, store, hidden)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _report(r: Any) -> ModuleReport | None:
    names = [f.name for f in dataclasses.fields(ModuleReport)]
    if not isinstance(r, dict) or sorted(r) != sorted(names):
        return None
    shape = r["shape"]
    if not (isinstance(r["name"], str) and isinstance(r["method"], str) and _int(r["layer"]) is not None
            and isinstance(shape, list) and len(shape) == 2 and all(_int(s) is not None and s > 0 for s in shape)
            and _number(r["sparsity"]) and 0 <= r["sparsity"] <= 1 and _number(r["seconds"]) and r["seconds"] >= 0):
        return None
    return ModuleReport(r["name"], r["layer"], (shape[0], shape[1]), float(r["sparsity"]), float(r["seconds"]),
                        r["method"])


def _portable_recipe(recipe: Recipe) -> dict:
    """``recipe.to_dict()`` with local paths made absolute (so the fingerprint is the same from any cwd)."""
    d = recipe.to_dict()
    src = Path(d["calibration"]["source"]).expanduser()
    if src.exists():
        d["calibration"]["source"] = str(src.resolve())
    gates = d["runtime"].get("gates")
    if gates and Path(gates).expanduser().exists():
        d["runtime"]["gates"] = str(Path(gates).expanduser().resolve())
    return d


def fingerprint(
    model_dir: Path, recipe: Recipe, dtype: torch.dtype, world: int, reduce: str, shard_size: int | None
) -> str:
    """A hash of what must not change between an interrupted run and its resumption."""
    return hashlib.sha256(json.dumps({
        "v": STATE_VERSION, "llmprune": __version__, "model": str(Path(model_dir).resolve()),
        "recipe": _portable_recipe(recipe), "dtype": str(dtype), "world": world, "reduce": reduce,
        "shard": shard_size,
    }, sort_keys=True, default=str).encode()).hexdigest()


def atomic_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` so a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def relative_source(cal: dict, work: WorkDir) -> dict:
    """``cal`` (a ``CalibConfig.to_dict()``) with a local source file recorded relative to the work directory."""
    src = Path(cal["source"]).expanduser()
    if src.exists():
        return {**cal, "source": os.path.relpath(src.resolve(), work.root.resolve())}
    return cal


def _prepare_root(work: WorkDir) -> None:
    """Make sure the work directory is a real directory (created if missing)."""
    if work.root.is_symlink():
        raise LlmpruneError(f"{work.root} is a symbolic link; refusing to use it as a work directory")
    if work.root.exists() and not work.root.is_dir():
        raise LlmpruneError(f"{work.root} exists and is not a directory; move it away")
    work.root.mkdir(parents=True, exist_ok=True)


def _clear_fresh(work: WorkDir) -> None:
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


def _prepare_hidden(work: WorkDir, spec: dict, offload_dir: str | os.PathLike | None) -> None:
    """Rank 0, fresh start: the activations' directory is empty or holds only an earlier run's files (removed)."""
    path = resolve_hidden(work, spec, offload_dir)
    if path.is_symlink() or path.exists():
        if not is_own_hidden_dir(path):
            raise LlmpruneError(f"{path} exists and holds files llmprune did not write; move it away")
        remove_layer_files(path)


def start_or_resume(
    work: WorkDir,
    fingerprint: str,
    *,
    resume: bool,
    ctx: DistContext,
    n_layers: int,
    output: Path,
    offload_dir: str | os.PathLike | None = None,
    lock: RunLock | None = None,
) -> tuple[RunState | None, Path]:
    """The state to resume from (or None after preparing a fresh work directory) and the activations' directory.

    Rank 0 takes ``lock``, reads and checks ``state.json`` and decides; every rank gets the decision.

    Raises:
        LlmpruneError: another run holds the lock; an interrupted run is there but ``resume`` is off; it belongs
            to a different run; ``state.json`` is damaged; a path in it points outside its base; the work
            directory holds files llmprune did not write.
    """
    state, spec, error = None, None, None
    if ctx.is_main:
        created = not (work.root.exists() or work.root.is_symlink())
        try:
            _prepare_root(work)
            if lock is not None:
                lock.acquire()
            if work.state.is_file():
                if not resume:
                    raise LlmpruneError(f"an interrupted run left {work.root}; pass --resume to continue it "
                                        "(or delete it)")
                try:
                    data = read_json(work.state, what="run state", expect=None, required=True)
                except LlmpruneError as exc:
                    raise LlmpruneError(f"{exc}; {work.hint()}") from None
                state = RunState.from_json(data, str(work.state), work.hint())
                if state.fingerprint != fingerprint:
                    raise LlmpruneError(f"{work.root} belongs to a different run (model, recipe, dtype or world "
                                        "size changed)")
                if state.n_layers != n_layers:
                    raise LlmpruneError(f"{work.state} records {state.n_layers} layers, the model has {n_layers}; "
                                        f"{work.hint()}")
                spec = state.hidden or hidden_spec(output, offload_dir)
                if state.hidden is not None:
                    resolve_hidden(work, state.hidden, offload_dir)
                log.info("resuming at layer %d of %d", state.next_layer, state.n_layers)
            else:
                if resume:
                    log.warning("--resume: no interrupted run at %s; starting from the beginning", work.root)
                _clear_fresh(work)
                spec = hidden_spec(output, offload_dir)
                _prepare_hidden(work, spec, offload_dir)
                work.ckpt.mkdir()
        except LlmpruneError as exc:
            error = str(exc)
            # Leave no trace of a run that never started; but never touch a lock another process won.
            if created and (lock is None or lock.fd is not None):
                if lock is not None:
                    lock.release()
                for p in (work.lock, work.ckpt):
                    if p.is_dir():
                        p.rmdir()
                    elif p.exists():
                        p.unlink()
                try:
                    work.root.rmdir()
                except OSError:
                    pass
    state, spec, error = broadcast_object((state, spec, error), ctx)
    if error:
        raise LlmpruneError(error)
    work.root.mkdir(parents=True, exist_ok=True)  # other nodes of a multi-node run without a shared filesystem
    ctx.barrier()
    return state, resolve_hidden(work, spec, offload_dir)


def commit(work: WorkDir, state: RunState, ctx: DistContext) -> None:
    """Record ``state`` once every rank has saved its inputs of ``state.next_layer``."""
    ctx.barrier()
    if ctx.is_main:
        atomic_json(work.state, state.to_json())
    ctx.barrier()


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
