"""Options of the streaming engine (:func:`llmprune.engine.streaming.compress_streaming`) and byte sizes."""

from __future__ import annotations

import dataclasses
import math
import os
import re

from llmprune.errors import ConfigError
from llmprune.formats.shards import DEFAULT_SHARD_SIZE


def parse_size(value: str | int | float | None) -> int | None:
    """``"20GiB"``, ``"500MB"``, ``"1e9"``, ``123`` -> bytes (None stays None)."""
    if value is None:
        return None
    bad = ConfigError(f"invalid size {value!r} (use e.g. 20GiB, 500MB or a number of bytes)")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        number, scale = float(value), 1
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise bad
        try:
            number = float(m.group(1))
        except ValueError:
            raise bad from None
        scale = (1024 if m.group(3) else 1000) ** " KMGT".index(m.group(2).upper() or " ")
    if not (math.isfinite(number) and 0 <= number * scale < 2**63):
        raise bad
    return int(number * scale)


@dataclasses.dataclass
class StreamOptions:
    """Options of the streaming engine.

    Attributes:
        resume: continue an interrupted run from ``<output>.partial``.
        max_memory: budget for calibration activations on the device (CUDA) or in RAM (CPU), e.g. ``"20GiB"``.
        offload_dir: where activations spilled to disk go (default: inside ``<output>.partial``).
        dist_reduce: ``"exact"`` or ``"sum"`` (:mod:`llmprune.calibration.distributed`).
        max_shard_size: largest output shard.
        stop_after: testing: raise :class:`SimulatedInterruption` after this many layers (when that is every
            layer left: after the last one, before the checkpoint is moved into place).
    """

    resume: bool = False
    max_memory: str | int | None = None
    offload_dir: str | os.PathLike | None = None
    dist_reduce: str = "exact"
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    stop_after: int | None = None


class SimulatedInterruption(RuntimeError):
    """Raised by ``StreamOptions.stop_after`` (tests of ``--resume``)."""
