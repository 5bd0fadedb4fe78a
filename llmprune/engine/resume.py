"""Resuming an interrupted streaming run: the work directory, ``state.json`` and the resume-or-start decision.

Everything a streaming run writes goes under ``<output>.partial/`` (:class:`WorkDir`). After each finished
layer :func:`commit` atomically rewrites ``state.json`` (:class:`RunState`: the next layer, the reports so far,
the calibration config, where the activations live); a run started again with ``resume`` continues from
there, provided its :func:`fingerprint` (model, recipe, dtype, world size, reduction, shard size) matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmprune._version import __version__
from llmprune.calibration.distributed import DistContext, broadcast_object
from llmprune.config import Recipe
from llmprune.errors import LlmpruneError
from llmprune.prune.report import ModuleReport

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1


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
    def calib(self) -> Path:
        return self.root / "calib.pt"

    def inputs(self, rank: int) -> Path:
        """Layer-0 positional/keyword arguments of ``rank``'s batches (masks, rotary embeddings)."""
        return self.root / f"inputs-rank{rank}.pt"


@dataclass
class RunState:
    """What ``state.json`` records of a streaming run.

    Attributes:
        fingerprint: the run's :func:`fingerprint`.
        n_layers: decoder layers of the model.
        next_layer: the first layer not committed yet.
        reports: the reports of the committed layers.
        seconds: pruning time so far.
        calibration: the calibration config used (``CalibConfig.to_dict()``).
        store: the activations' :func:`~llmprune.engine.activations.store_mode` (None without calibration).
        hidden_dir: where the activations' files are.
    """

    fingerprint: str
    n_layers: int
    next_layer: int = 0
    reports: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict | None = None
    store: str | None = None
    hidden_dir: str | None = None

    def to_json(self) -> dict:
        return {
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "next_layer": self.next_layer,
            "n_layers": self.n_layers, "reports": [dataclasses.asdict(r) for r in self.reports],
            "seconds": self.seconds, "calibration": self.calibration, "store": self.store,
            "hidden_dir": self.hidden_dir,
        }

    @classmethod
    def from_json(cls, d: dict) -> RunState:
        reports = [ModuleReport(**{**r, "shape": tuple(r["shape"])}) for r in d["reports"]]
        return cls(d["fingerprint"], int(d["n_layers"]), int(d["next_layer"]), reports, float(d["seconds"]),
                   d["calibration"], d["store"], d["hidden_dir"])


def fingerprint(
    model_dir: Path, recipe: Recipe, dtype: torch.dtype, world: int, reduce: str, shard_size: int | None
) -> str:
    """A hash of what must not change between an interrupted run and its resumption."""
    return hashlib.sha256(json.dumps({
        "v": STATE_VERSION, "llmprune": __version__, "model": str(model_dir.resolve()), "recipe": recipe.to_dict(),
        "dtype": str(dtype), "world": world, "reduce": reduce, "shard": shard_size,
    }, sort_keys=True, default=str).encode()).hexdigest()


def atomic_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` so a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_or_resume(work: WorkDir, fingerprint: str, *, resume: bool, ctx: DistContext) -> RunState | None:
    """The state to resume from, or None after preparing a fresh work directory (rank 0 decides).

    Raises:
        LlmpruneError: an interrupted run is there but ``resume`` is off, or it belongs to a different run.
    """
    state, error = None, None
    if ctx.is_main:
        if work.state.is_file():
            old = json.loads(work.state.read_text())
            if not resume:
                error = f"an interrupted run left {work.root}; pass --resume to continue it (or delete it)"
            elif old.get("fingerprint") != fingerprint:
                error = f"{work.root} belongs to a different run (model, recipe, dtype or world size changed)"
            else:
                state = RunState.from_json(old)
                log.info("resuming at layer %d of %d", state.next_layer, state.n_layers)
        else:
            if resume:
                log.warning("--resume: no interrupted run at %s; starting from the beginning", work.root)
            shutil.rmtree(work.root, ignore_errors=True)
            work.ckpt.mkdir(parents=True)
    state, error = broadcast_object((state, error), ctx)
    if error:
        raise LlmpruneError(error)
    work.root.mkdir(parents=True, exist_ok=True)  # other nodes of a multi-node run without a shared filesystem
    ctx.barrier()
    return state


def commit(work: WorkDir, state: RunState, ctx: DistContext) -> None:
    """Record ``state`` once every rank has saved its inputs of ``state.next_layer``."""
    ctx.barrier()
    if ctx.is_main:
        atomic_json(work.state, state.to_json())
    ctx.barrier()
