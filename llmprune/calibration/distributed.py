"""Multi-process pruning with ``torch.distributed`` (``torchrun --nproc-per-node N -m llmprune compress ...``).

Every rank holds the same decoder layer and runs a disjoint share of the calibration *batches* (round robin:
global batch ``g`` belongs to rank ``g % world``); the statistics each method needs are then combined so that
every rank computes the same masks and rank 0 writes the checkpoint. Two reductions:

* ``exact`` (default): the per-batch contribution of every batch is broadcast from its owner and all ranks add
  them in global batch order, exactly as the single-process driver does (``sum += c_0``, ``sum += c_1``, ...).
  The result is **bit-identical** to a single-process run with the same per-process numerics (same kernels and
  thread count). Cost: one statistic-sized broadcast per calibration batch (for SparseGPT on a 70B layer about
  5 GB per batch over NVLink, well under a second).
* ``sum``: one ``all_reduce`` of each accumulator's ``sum`` tensor and token ``count`` per layer. Every rank gets
  the same reduced tensors (so masks agree across ranks), equal to the single-process run up to fp32 summation
  order.

Backend: ``nccl`` when the layers run on CUDA (each rank on ``cuda:$LOCAL_RANK``), ``gloo`` on CPU.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune.calibration.stats import Accumulators
from llmprune.errors import ConfigError

log = logging.getLogger(__name__)

REDUCTIONS = ("exact", "sum")


@dataclass
class DistContext:
    """Where this process stands: ``world`` processes, this one is ``rank``."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # True when this module initialised the process group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def env_world_size() -> int:
    """Processes in this run: the initialised group's size, else ``$WORLD_SIZE`` (torchrun), else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group launched by ``torchrun`` (no-op for a single process).

    Returns the context and the device this rank computes on (``cuda:$LOCAL_RANK`` for CUDA).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)),
                          dist.get_backend())
    elif env_world_size() > 1:
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), local, backend, owns_group=True)
        log.info("torch.distributed: rank %d/%d, backend %s", ctx.rank, ctx.world, backend)
    else:
        return DistContext(), device
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    return ctx, device


def owned_batches(n_batches: int, ctx: DistContext) -> list[int]:
    """Global batch indices run by this rank (round robin)."""
    return list(range(ctx.rank, n_batches, ctx.world))


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Broadcast a picklable object (small: shapes, metadata) from ``src``."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(t: torch.Tensor | None, ctx: DistContext, device: torch.device, src: int = 0) -> torch.Tensor:
    """Broadcast a tensor of unknown shape/dtype from ``src`` (returned on ``device``)."""
    if not ctx.enabled:
        return t
    meta = broadcast_object((tuple(t.shape), t.dtype) if ctx.rank == src else None, ctx, src)
    buf = t.to(device).contiguous() if ctx.rank == src else torch.empty(meta[0], dtype=meta[1], device=device)
    torch.distributed.broadcast(buf, src=src)
    return buf


def _acc_items(stats: Accumulators) -> list[tuple[str, str, object]]:
    return [(name, s, stats[name][s]) for name in sorted(stats) for s in sorted(stats[name])]


def allreduce_stats(stats: Accumulators, ctx: DistContext) -> None:
    """``sum`` reduction: all-reduce every accumulator's ``sum`` tensors and ``count`` in place.

    ``stats``: ``{module name: {stat name: accumulator}}`` as built by the driver.
    """
    if not ctx.enabled:
        return
    items = _acc_items(stats)
    for _, _, acc in items:
        for t in acc.tensors():
            torch.distributed.all_reduce(t)
    if items:
        dev = items[0][2].tensors()[0].device
        counts = torch.tensor([acc.count for _, _, acc in items], dtype=torch.int64, device=dev)
        torch.distributed.all_reduce(counts)
        for (_, _, acc), c in zip(items, counts.tolist()):
            acc.count = int(c)


def make_reduce(ctx: DistContext) -> Callable[[Accumulators], None] | None:
    """A ``reduce`` callable for :func:`llmprune.engine.layerwise.prune_layerwise` (``sum`` reduction)."""
    if not ctx.enabled:
        return None
    return lambda stats: allreduce_stats(stats, ctx)


def make_all_reduce(ctx: DistContext) -> Callable[[list[torch.Tensor]], None] | None:
    """``all_reduce(tensors)``: sum each tensor in place over all ranks (gradients of block recovery,
    :mod:`llmprune.recover.block`); None for one process."""
    if not ctx.enabled:
        return None

    def all_reduce(tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            torch.distributed.all_reduce(t)

    return all_reduce


@dataclass(frozen=True)
class Reduction:
    """How the statistics of one layer from this process's batches become the layer's statistics.

    Attributes:
        finish: called with the totals (:data:`~llmprune.calibration.stats.Accumulators`) once every batch
            ran and before any mask is computed (the ``sum`` reduction). None: nothing.
        exchange: when set, each batch feeds fresh accumulators and ``exchange(position, batch accumulators,
            totals)`` adds them into the totals after the batch (the ``exact`` reduction).
        rounds: with ``exchange``, the batch positions every process goes through; a process with fewer
            batches runs empty ones, so every process calls ``exchange`` (and its collectives) equally often.
    """

    finish: Callable[[Accumulators], None] | None = None
    exchange: Callable[[int, Accumulators, Accumulators], None] | None = None
    rounds: int = 0


def make_reduction(ctx: DistContext, mode: str, n_batches: int, device: torch.device) -> Reduction | None:
    """The :class:`Reduction` of ``mode`` (``"exact"`` or ``"sum"``) for this rank; None for one process.

    Args:
        ctx: the process group.
        mode: one of :data:`REDUCTIONS`.
        n_batches: calibration batches over all ranks (rank ``r`` runs ``r, r + world, ...``,
            :func:`owned_batches`).
        device: where the statistics live.
    """
    if not ctx.enabled:
        return None
    if mode == "sum":
        return Reduction(finish=lambda stats: allreduce_stats(stats, ctx))
    if mode != "exact":
        raise ConfigError(f"dist_reduce must be one of {', '.join(REDUCTIONS)}, got {mode!r}")

    def exchange(position: int, batch_stats: Accumulators, totals: Accumulators) -> None:
        first = position * ctx.world
        batches = [b for b in range(first, first + ctx.world) if b < n_batches]
        exchange_round(totals, batch_stats if ctx.rank < len(batches) else None, batches, ctx, device)

    return Reduction(exchange=exchange, rounds=math.ceil(n_batches / ctx.world))


def exchange_round(
    totals: Accumulators, pending: Accumulators | None, batches: list[int], ctx: DistContext, device: torch.device
) -> None:
    """``exact`` reduction of one round of batches.

    ``batches`` lists the global batch indices of this round (one per rank, rank ``r`` owns ``batches[r]``,
    ascending); ``pending`` holds this rank's fresh accumulators fed by its batch of the round (None when it
    had none). Each owner broadcasts its contribution, and every rank adds the contributions into ``totals``
    in ascending global batch order: the same additions as the single-process driver.
    """
    items = _acc_items(totals)
    for r, _g in enumerate(batches):
        if r == ctx.rank:
            mine = _acc_items(pending)
            bufs = [[t.contiguous() for t in acc.tensors()] for _, _, acc in mine]
            counts = torch.tensor([acc.count for _, _, acc in mine], dtype=torch.int64, device=device)
        else:
            bufs = [[torch.empty_like(t) for t in acc.tensors()] for _, _, acc in items]
            counts = torch.empty(len(items), dtype=torch.int64, device=device)
        for group in bufs:
            for b in group:
                torch.distributed.broadcast(b, src=r)
        torch.distributed.broadcast(counts, src=r)
        for (_, _, acc), group, c in zip(items, bufs, counts.tolist()):
            for dst, b in zip(acc.tensors(), group):
                dst += b
            acc.count += int(c)
