"""Collecting calibration statistics: accumulators fed by forward hooks while batches run through a layer.

The one place where statistics hooks are attached, batches run and the hooks removed again. The engine's
per-layer step (:func:`llmprune.engine.step.prune_layer`) and CFSP's block statistics
(:func:`llmprune.calibration.blockstats.collect_stats`) both go through :func:`collect`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from torch import nn

from llmprune.calibration.stats import Accumulators, feed_hook

T = TypeVar("T")


class _Enough(Exception):
    """Raised by the hook of the last module to be fed: the rest of the forward pass is not needed."""


def collect(
    modules: Mapping[str, nn.Module],
    accumulators: Accumulators,
    batches: Iterable[Callable[[], T]],
    *,
    fresh: Callable[[], Accumulators] | None = None,
    on_batch: Callable[[int, T | None, Accumulators], None] | None = None,
    stop_early: bool = False,
) -> None:
    """Run ``batches`` with every module's inputs feeding its accumulators; hooks are removed afterwards.

    Args:
        modules: ``{name: module}`` whose inputs (``args[0]``, ``[..., in_features]``) are accumulated.
        accumulators: ``{name: {statistic: accumulator}}`` with an entry for every name in ``modules``; fed
            directly unless ``fresh`` is given.
        batches: one callable per batch; calling it runs the forward pass (the hooks fire inside) and returns
            whatever the caller wants to see afterwards, e.g. the layer's input and output hidden states.
        fresh: when given, each batch instead feeds the new accumulators ``fresh()`` returns (same layout as
            ``accumulators``), and ``on_batch`` merges them in (the distributed ``exact`` reduction).
        on_batch: called after each batch as ``on_batch(position, returned value, accumulators it fed)``; the
            value is None for a batch cut short by ``stop_early``.
        stop_early: the caller needs only the statistics, not what the batches return: once a batch ran in
            full and called every module exactly once, later batches stop (an exception raised in the last
            module's pre-hook, caught here) as soon as every module was fed, so the rest of the forward pass
            (e.g. ``down_proj`` of a decoder layer and what follows it) is never computed. The statistics
            are the same as without it.
    """
    feeds: dict[str, dict] = {name: ({} if fresh is not None else accumulators[name]) for name in modules}
    memo: dict = {}  # one batch's per-input terms, shared by modules fed the same tensor (q/k/v, gate/up)
    calls: list[str] = []  # the modules fed so far in this batch, in order
    last: list[str | None] = [None]  # the module whose pre-hook ends a batch (learned from a full batch)

    def make(name: str):
        feed = feed_hook(feeds[name], memo)

        def hook(module, args):
            feed(module, args)
            calls.append(name)
            if name == last[0] and len(set(calls)) == len(modules):
                raise _Enough

        return hook

    handles = [mod.register_forward_pre_hook(make(name)) for name, mod in modules.items()]
    try:
        for position, run in enumerate(batches):
            fed = accumulators
            if fresh is not None:
                fed = fresh()
                for name, feed in feeds.items():
                    feed.clear()
                    feed.update(fed[name])
            memo.clear()
            calls.clear()
            try:
                value = run()
            except _Enough:
                value = None
            if stop_early and last[0] is None and len(calls) == len(set(calls)) == len(modules):
                last[0] = calls[-1]  # a full batch fed every module once: later ones stop after this one
            if on_batch is not None:
                on_batch(position, value, fed)
    finally:
        memo.clear()
        for h in handles:
            h.remove()
