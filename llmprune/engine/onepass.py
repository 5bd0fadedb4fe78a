"""The per-layer step in one forward pass: each linear's statistics from the layer with its earlier linears
already pruned ("module" order), pruned as soon as every batch reached it.

:func:`llmprune.engine.step.prune_layer` takes a layer's statistics from the dense layer (one pass), prunes,
and the loop runs the pruned layer again for the next layer's inputs (a second pass). Here the batches run
through the layer once, in lockstep (:mod:`llmprune.calibration.lockstep`): before ``q_proj`` every batch
has fed ``q_proj``'s statistics, it is pruned, the batches go on to ``k_proj``, ... and ``down_proj``'s
statistics see the outputs of the pruned ``gate_proj``/``up_proj``. The outputs of that pass are the pruned
layer's outputs, so they feed the next layer directly: one decoder forward per layer instead of two (the
order GPTQ calls "true-sequential", as SparseGPT's and Wanda's layer-to-layer order carried inside a layer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from llmprune.calibration.distributed import Reduction
from llmprune.calibration.lockstep import Lockstep
from llmprune.calibration.stats import Accumulators, feed_hook, make_accumulator
from llmprune.config import PruneConfig
from llmprune.engine.step import apply_method, check_finite, new_accumulators
from llmprune.model.access import linear_modules
from llmprune.prune.registry import Method
from llmprune.prune.report import ModuleReport


class _Feeds:
    """Statistics hooks for the lockstep pass: each batch feeds ``totals`` (or, with an ``exact`` reduction,
    accumulators of its own, merged into the totals module by module in batch order). A batch's q/k/v (and
    gate/up) share one input tensor, so its per-input terms are computed once (``feed_hook``'s memo, one per
    batch, emptied when the batch moves on to another input)."""

    def __init__(self, method: Method, targets: Mapping[str, nn.Linear], totals: Accumulators, n_batches: int,
                 device: torch.device, per_batch: bool, lockstep: Lockstep) -> None:
        self.method, self.targets, self.totals, self.device = method, targets, totals, device
        self.lockstep = lockstep
        self.memos: list[dict] = [{} for _ in range(n_batches)]
        # per batch, created when the batch first feeds a module (so only the modules in flight hold them)
        self.own: list[dict] | None = [{} for _ in range(n_batches)] if per_batch else None
        self.hooks: dict[tuple[int, str], Callable] = {}

    def own_of(self, b: int, name: str) -> Mapping:
        """Batch ``b``'s accumulators of module ``name`` (empty ones if it fed none)."""
        if name not in self.own[b]:
            self.own[b][name] = {s: make_accumulator(s, self.targets[name], self.device) for s in self.method.stats}
        return self.own[b][name]

    def hook(self, name: str):
        def feed(module, args):
            b = self.lockstep.current_batch
            memo = self.memos[b]
            if memo and not any(entry[0] is args[0] for entry in memo.values()):
                memo.clear()  # a new input: the terms of the previous one are not needed again
            fn = self.hooks.get((b, name))
            if fn is None:
                accs = self.own_of(b, name) if self.own is not None else self.totals[name]
                fn = self.hooks[(b, name)] = feed_hook(accs, memo)
            fn(module, args)

        return feed


@torch.no_grad()
def prune_layer_one_pass(
    layer: nn.Module,
    idx: int,
    prefix: str,
    method: Method,
    config: PruneConfig,
    batches: Sequence[Callable[[], torch.Tensor]],
    *,
    device: torch.device,
    ignore: Callable[[str], bool],
    reduce: Reduction | None = None,
) -> tuple[list[ModuleReport], list[torch.Tensor]]:
    """Calibrate and prune every linear of one decoder layer in place, in one pass; also return its outputs.

    Args:
        layer: decoder layer ``idx``, on ``device``.
        idx: its index.
        prefix: the decoder layers' module path (``model.layers``).
        method: a ``"linear"`` method with statistics (``method.stats``).
        config: its config.
        batches: one callable per calibration batch of this process, each running ``layer`` on the batch and
            returning its output hidden states ``[b, s, hidden]``.
        device: where the statistics live (and, for CUDA, where the batches compute).
        ignore: predicate on full module names; True = leave dense.
        reduce: multi-process runs (every process has at least one batch, and the layers reach their linears
            in the same order): each linear's statistics are combined over the processes right before it is
            pruned. None: one process.

    Returns:
        ``(reports, outputs)``: one :class:`ModuleReport` per pruned linear, and the pruned layer's output for
        every batch, in batch order.

    Raises:
        LlmpruneError: a target's weight holds NaN/inf.
        PruneIntegrityError: a pruned weight is not finite or not of the config's N:M pattern.
        DivergentPathsError: the batches reached the linears in different orders.
    """
    targets = {name: mod for name, mod in linear_modules(layer).items() if not ignore(f"{prefix}.{idx}.{name}")}
    check_finite(targets, lambda name: f"{prefix}.{idx}.{name}")
    t0 = time.perf_counter()
    stats = new_accumulators(method, targets, device)
    exact = reduce is not None and reduce.exchange is not None
    reports: dict[str, ModuleReport] = {}

    def finish(name: str) -> None:
        mine = {name: stats[name]}
        if exact:
            for position in range(reduce.rounds):
                own = feeds.own_of(position, name) if position < len(batches) else \
                    {s: make_accumulator(s, targets[name], device) for s in method.stats}
                reduce.exchange(position, {name: own}, mine)
            for own in feeds.own:
                own.pop(name, None)  # merged: free them
        elif reduce is not None and reduce.finish is not None:
            reduce.finish(mine)
        reports[name] = apply_method(method, config, {name: targets[name]}, stats, prefix, idx, 0.0)[0]

    lockstep = Lockstep(targets, batches, finish, device=device)
    feeds = _Feeds(method, targets, stats, len(batches), device, exact, lockstep)
    handles = [mod.register_forward_pre_hook(feeds.hook(name)) for name, mod in targets.items()]
    try:
        outputs = lockstep.run()  # the statistics hooks are registered first, so they run before each pause
    finally:
        for h in handles:
            h.remove()
    for name in targets:
        if name not in reports:  # no batch reached it: pruned from empty statistics, as the two-pass step does
            finish(name)
    share = (time.perf_counter() - t0 - sum(r.seconds for r in reports.values())) / max(len(targets), 1)
    return [dataclasses.replace(reports[n], seconds=reports[n].seconds + share) for n in targets], outputs
