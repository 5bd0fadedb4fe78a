"""Options of the streaming engine (:func:`llmprune.engine.streaming.compress_streaming`) and byte sizes."""

from __future__ import annotations

import dataclasses
import os
import re

from llmprune.errors import ConfigError
from llmprune.formats.shards import DEFAULT_SHARD_SIZE


def parse_size(value: str | int | float | None) -> int | None:
    """``"20GiB"``, ``"500MB"``, ``"1e9"``, ``123`` -> bytes (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"invalid size {value!r} (use e.g. 20GiB, 500MB or a number of bytes)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


@dataclasses.dataclass
class StreamOptions:
    """Options of the streaming engine.

    Attributes:
        resume: continue an interrupted run from ``<output>.partial``.
        max_memory: budget for calibration activations on the device (CUDA) or in RAM (CPU), e.g. ``"20GiB"``.
        offload_dir: where activations spilled to disk go (default: inside ``<output>.partial``).
        dist_reduce: ``"exact"`` or ``"sum"`` (:mod:`llmprune.calibration.distributed`).
        max_shard_size: largest output shard.
        stop_after: testing: raise :class:`SimulatedInterruption` after this many layers.
    """

    resume: bool = False
    max_memory: str | int | None = None
    offload_dir: str | os.PathLike | None = None
    dist_reduce: str = "exact"
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    stop_after: int | None = None


class SimulatedInterruption(RuntimeError):
    """Raised by ``StreamOptions.stop_after`` (tests of ``--resume``)."""
