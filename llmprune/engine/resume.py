"""Resuming an interrupted streaming run: ``state.json`` and the resume-or-start decision.

After each finished layer :func:`commit` atomically rewrites ``<output>.partial/state.json`` (:class:`RunState`:
the next layer, the reports so far, the calibration config, where the activations live); a run started again
with ``resume`` continues from there, provided its :func:`fingerprint` (model, recipe, dtype, world size,
reduction, shard size) matches. The work directory itself (layout, lock, what may be deleted, where the
activations may live) is :mod:`llmprune.engine.workdir`'s.

``state.json`` is input like any other: :meth:`RunState.from_json` checks its shape and types, and a garbled or
tampered file is one :class:`~llmprune.errors.LlmpruneError` suggesting to delete the ``.partial`` directory.
Paths in it are relative (to ``<output>.partial`` or to the ``--offload-dir`` given), so a run resumes from any
working directory; :func:`~llmprune.engine.workdir.resolve_hidden` refuses one that leaves its base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprune._version import __version__
from llmprune.calibration.distributed import DistContext, broadcast_object
from llmprune.config import CalibConfig, Recipe, build
from llmprune.engine.workdir import (
    HIDDEN_BASES,
    STATE_FILE,
    RunLock,
    WorkDir,
    clear_fresh,
    hidden_spec,
    prepare_hidden,
    prepare_root,
    resolve_hidden,
)
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.reading import read_json
from llmprune.prune.report import ModuleReport

log = logging.getLogger(__name__)

STATE_VERSION = 3  # 3: module reports carry their block recovery
STORE_MODES = ("device", "cpu", "disk")


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
    if r["recovery"] is not None and not isinstance(r["recovery"], dict):
        return None
    return ModuleReport(r["name"], r["layer"], (shape[0], shape[1]), float(r["sparsity"]), float(r["seconds"]),
                        r["method"], r["recovery"])


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


def relative_source(cal: dict, work: WorkDir) -> dict:
    """``cal`` (a ``CalibConfig.to_dict()``) with a local source file recorded relative to the work directory."""
    src = Path(cal["source"]).expanduser()
    if src.exists():
        return {**cal, "source": os.path.relpath(src.resolve(), work.root.resolve())}
    return cal


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
            prepare_root(work)
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
                clear_fresh(work)
                spec = hidden_spec(output, offload_dir)
                prepare_hidden(work, spec, offload_dir)
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


