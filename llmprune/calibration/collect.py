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


def collect(
    modules: Mapping[str, nn.Module],
    accumulators: Accumulators,
    batches: Iterable[Callable[[], T]],
    *,
    fresh: Callable[[], Accumulators] | None = None,
    on_batch: Callable[[int, T, Accumulators], None] | None = None,
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
        on_batch: called after each batch as ``on_batch(position, returned value, accumulators it fed)``.
    """
    feeds: dict[str, dict] = {name: ({} if fresh is not None else accumulators[name]) for name in modules}
    handles = [mod.register_forward_hook(feed_hook(feeds[name])) for name, mod in modules.items()]
    try:
        for position, run in enumerate(batches):
            fed = accumulators
            if fresh is not None:
                fed = fresh()
                for name, feed in feeds.items():
                    feed.clear()
                    feed.update(fed[name])
            value = run()
            if on_batch is not None:
                on_batch(position, value, fed)
    finally:
        for h in handles:
            h.remove()
