"""The per-layer step: calibrate -> method -> apply, for one decoder layer already on its device.

Both loops, in memory (:mod:`llmprune.engine.layerwise`) and streaming (:mod:`llmprune.engine.streaming`), call
:func:`prune_layer` once per decoder layer; they differ only in where the layer's weights and calibration
activations come from and where the pruned layer goes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from llmprune.calibration.collect import collect
from llmprune.calibration.distributed import Reduction
from llmprune.calibration.stats import Accumulators, make_accumulator
from llmprune.config import PruneConfig, RecoveryConfig
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.safetensors_io import is_finite
from llmprune.model.access import (
    DEFAULT_IGNORE,
    decoder_layers,
    decoder_layers_path,
    linear_modules,
    matches_any,
)
from llmprune.prune.registry import Method, method_for_config
from llmprune.prune.report import ModuleReport
from llmprune.recover.batches import Schedule
from llmprune.recover.block import AllReduce
from llmprune.recover.capture import DenseBatch, record_dense
from llmprune.recover.layer import find_attn, recover_block
from llmprune.sparsity import SparsityPattern, check_nm, sparsity_of


class PruneIntegrityError(RuntimeError):
    """Internal error: a pruned linear does not have the pattern it was pruned to, or holds NaN/inf values.

    Raised before the layer is written anywhere, so such a model is never saved.
    """


def check_ignore_patterns(model: nn.Module, patterns: Iterable[str]) -> None:
    """Every user ``--ignore`` pattern matches at least one module of ``model``.

    Raises:
        ConfigError: naming the first pattern that matches nothing.
    """
    names = [n for n, _ in model.named_modules() if n]
    for pat in patterns:
        if not any(matches_any(n, (pat,)) for n in names):
            example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), names[0] if names else "")
            raise ConfigError(f"--ignore pattern {pat!r} matches no module of the model (module names look like "
                              f"{example!r})")


def check_nm_shapes(model: nn.Module, pattern: SparsityPattern, ignore: Iterable[str] = ()) -> None:
    """Every linear of the decoder layers that ``pattern`` (N:M) prunes has an input size divisible by M.

    Works on a meta-device skeleton as well as on a loaded model (only shapes are read).

    Raises:
        ConfigError: naming the offending modules and their weight shapes.
    """
    if not pattern.is_nm:
        return
    patterns = DEFAULT_IGNORE + tuple(ignore)
    prefix = decoder_layers_path(model)
    bad: dict[tuple[str, tuple[int, int]], int] = {}
    for idx, layer in enumerate(decoder_layers(model)):
        for name, mod in linear_modules(layer).items():
            if matches_any(f"{prefix}.{idx}.{name}", patterns) or mod.in_features % pattern.m == 0:
                continue
            key = (name, (mod.out_features, mod.in_features))
            bad[key] = bad.get(key, 0) + 1
    if bad:
        what = ", ".join(f"{name} weight [{o}, {i}] ({i} % {pattern.m} = {i % pattern.m}; {n} layer{'s' * (n > 1)})"
                         for (name, (o, i)), n in list(bad.items())[:3])
        raise ConfigError(f"sparsity {pattern} needs the input size of every pruned linear to be a multiple of "
                          f"{pattern.m}: {what}; choose another N:M or --ignore those modules")


def check_stages(model: nn.Module, stages: Sequence[PruneConfig]) -> None:
    """What can be checked of ``stages`` on ``model``'s structure before any calibration: ``ignore`` patterns
    match modules, N:M patterns of per-linear methods divide the pruned linears' input sizes."""
    for stage in stages:
        check_ignore_patterns(model, stage.ignore)
    for stage in stages:
        if method_for_config(stage).kind == "linear":
            check_nm_shapes(model, stage.sparsity, stage.ignore)


def check_finite(targets: Mapping[str, nn.Module], full_name: Callable[[str], str]) -> None:
    """The weights about to be pruned hold no NaN/inf (such a model would be pruned and saved as garbage).

    Raises:
        LlmpruneError: naming the first module with non-finite values.
    """
    for name, mod in targets.items():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not is_finite(w):
            n_bad = int((~torch.isfinite(w)).sum())
            raise LlmpruneError(f"{full_name(name)}: the weight holds {n_bad} NaN/inf values of {w.numel()}; "
                                "refusing to prune it (the checkpoint is damaged or was loaded in a dtype too "
                                "narrow for it)")


def verify_pruned(name: str, weight: torch.Tensor, pattern: SparsityPattern | None, method: str) -> None:
    """A pruned linear's weight is finite and, for N:M, keeps at most N of every M inputs.

    Raises:
        PruneIntegrityError: an internal error (a method's bug), before anything is written.
    """
    if not is_finite(weight):
        raise PruneIntegrityError(f"internal error: {name} holds NaN/inf values after {method}; nothing was saved")
    if pattern is not None and pattern.is_nm and not check_nm(weight != 0, pattern.n, pattern.m):
        raise PruneIntegrityError(f"internal error: {name} is not {pattern} sparse after {method}; nothing was saved")



def new_accumulators(method: Method, targets: Mapping[str, nn.Linear], device: torch.device) -> Accumulators:
    """Empty ``{module name: {statistic: accumulator}}`` for every statistic ``method`` needs."""
    return {name: {s: make_accumulator(s, mod, device) for s in method.stats} for name, mod in targets.items()}


def apply_method(
    method: Method,
    config: PruneConfig,
    targets: Mapping[str, nn.Linear],
    stats: Accumulators,
    prefix: str,
    idx: int,
    stat_seconds: float,
) -> list[ModuleReport]:
    """Prune each target linear of decoder layer ``idx`` in place from its finished statistics.

    Args:
        method: the ``"linear"`` method; ``method.fn(weight [out, in], {statistic: result}, config)`` returns
            the new weight and its keep-mask (both ``[out, in]``).
        config: the method's config.
        targets: ``{name in the layer: linear}`` to prune.
        stats: the accumulated statistics of the targets (empty for data-free methods).
        prefix: the decoder layers' module path (e.g. ``model.layers``), for the reported names.
        idx: the decoder layer's index.
        stat_seconds: the layer's statistics pass, shared evenly across the targets' reported times.

    Returns:
        One :class:`ModuleReport` per target.
    """
    reports = []
    for name, mod in targets.items():
        t1 = time.perf_counter()
        results = {s: acc.result() for s, acc in stats.get(name, {}).items()}
        new_weight, mask = method.fn(mod.weight.data, results, config)
        mod.weight.data.copy_(new_weight)
        verify_pruned(f"{prefix}.{idx}.{name}", mod.weight.data, config.sparsity, method.name)
        sparsity = 1.0 - int(torch.count_nonzero(mask)) / mask.numel()
        secs = time.perf_counter() - t1 + stat_seconds / max(len(targets), 1)
        reports.append(ModuleReport(f"{prefix}.{idx}.{name}", idx, tuple(mod.weight.shape), sparsity, secs, method.name))
    return reports


def _no_batch() -> None:
    """An empty batch position (a process with fewer batches than the ``exact`` reduction's rounds)."""


@torch.no_grad()
def prune_layer(
    layer: nn.Module,
    idx: int,
    prefix: str,
    method: Method,
    config: PruneConfig,
    batches: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    ignore: Callable[[str], bool],
    reduce: Reduction | None = None,
    recover: RecoveryConfig | None = None,
    schedule: Schedule | None = None,
    all_reduce: AllReduce | None = None,
    progress: bool = False,
) -> list[ModuleReport]:
    """Calibrate, then prune every linear of one decoder layer in place (then recover it, with ``recover``).

    Args:
        layer: decoder layer ``idx``, on ``device``.
        idx: its index.
        prefix: the decoder layers' module path (``model.layers``); ``f"{prefix}.{idx}.{name}"`` is a linear's
            full name.
        method: :class:`~llmprune.prune.registry.Method` of kind ``"linear"``.
        config: its config.
        batches: one callable per calibration batch of this process, each running ``layer`` on the batch's
            ``[b, s, hidden]`` inputs (the statistics hooks see the linears' inputs); unused by data-free
            methods.
        device: where the statistics live.
        ignore: predicate on full module names; True = leave dense.
        reduce: how this process's statistics are combined with other processes' before any mask is
            computed (:func:`llmprune.calibration.distributed.make_reduction`); None: used as they are.
        recover: block recovery (``mode="block"``): the dense layer's inputs and outputs are recorded during
            the statistics pass and the pruned layer is reconstructed against them (:mod:`llmprune.recover`).
        schedule: multi-process runs: the global batch of each local batch (default: all batches are local).
        all_reduce: multi-process runs: sums recovery gradients over processes in place.
        progress: a progress bar over the recovery steps.

    Returns:
        One :class:`ModuleReport` per pruned linear.

    Raises:
        LlmpruneError: a target's weight holds NaN/inf (checked before any statistic or method runs).
        PruneIntegrityError: a pruned weight is not finite or not of the config's N:M pattern.
    """
    targets = {name: mod for name, mod in linear_modules(layer).items() if not ignore(f"{prefix}.{idx}.{name}")}
    check_finite(targets, lambda name: f"{prefix}.{idx}.{name}")
    stats: Accumulators = {}
    t0 = time.perf_counter()
    recovering = recover is not None and recover.block is not None
    with record_dense(layer, find_attn(layer)) if recovering else nullcontext([]) as dense:
        if method.stats:
            stats = new_accumulators(method, targets, device)
            exchange = reduce.exchange if reduce is not None else None
            fresh = on_batch = None
            if exchange is not None:  # every batch feeds its own accumulators, merged in by the exchange
                batches = [*batches, *[_no_batch] * (reduce.rounds - len(batches))]
                fresh = partial(new_accumulators, method, targets, device)
                on_batch = lambda position, _value, batch_stats: exchange(position, batch_stats, stats)  # noqa: E731
            # Only the statistics are needed from this pass (recovery records outputs, so runs it in full).
            collect(targets, stats, batches, fresh=fresh, on_batch=on_batch, stop_early=not recovering)
            if reduce is not None and reduce.finish is not None:
                reduce.finish(stats)
        elif recovering:  # a data-free method: the dense pass runs for the recovery alone
            for run in batches:
                run()
    reports = apply_method(method, config, targets, stats, prefix, idx, time.perf_counter() - t0)
    if not recovering:
        return reports
    return recover_layer(layer, targets, dense, recover, config, reports, schedule=schedule,
                         all_reduce=all_reduce, progress=progress, desc=f"layer {idx}")


def recover_layer(
    layer: nn.Module,
    targets: Mapping[str, nn.Linear],
    dense: Sequence[DenseBatch],
    recover: RecoveryConfig,
    config: PruneConfig,
    reports: list[ModuleReport],
    **options,
) -> list[ModuleReport]:
    """Block recovery of a pruned layer (:func:`llmprune.recover.layer.recover_block`), then the checks: every
    recovered weight is finite, of the stage's N:M pattern, and (fixed mask) non-zero only where it was kept.

    Returns:
        ``reports`` with each module's sparsity after recovery, its share of the recovery time and its
        part's losses (``recovery``).

    Raises:
        PruneIntegrityError: an internal error, before anything is written.
    """
    kept = {name: mod.weight.data != 0 for name, mod in targets.items()} if recover.mask == "fixed" else {}
    results = recover_block(layer, targets, dense, recover, config, **options)
    part_of = {name: (res, len(names)) for res, names in results.values() for name in names}
    out = []
    for (name, mod), rep in zip(targets.items(), reports):
        w = mod.weight.data
        verify_pruned(rep.name, w, config.sparsity, "recovery")
        if name in kept and bool(((w != 0) & ~kept[name]).any()):
            raise PruneIntegrityError(f"internal error: recovery filled pruned entries of {rep.name}; nothing was saved")
        if name not in part_of:
            out.append(rep)
            continue
        res, n = part_of[name]
        out.append(dataclasses.replace(rep, sparsity=sparsity_of(w), seconds=rep.seconds + res.seconds / n,
                                       recovery={"part": res.part, **res.to_dict()}))
    return out


def verify_model(model: nn.Module, stages: Sequence[PruneConfig], modules: Sequence[ModuleReport]) -> None:
    """Before a checkpoint is written: every reported (pruned) module is finite, at least as sparse as reported
    (nothing after pruning, e.g. recovery, filled zeros back in) and, for a single per-linear N:M stage, of that
    pattern (each stage's pattern is verified right after its method ran, in the step).

    Raises:
        PruneIntegrityError: an internal error; the checkpoint must not be written.
    """
    single = len(stages) == 1 and method_for_config(stages[0]).kind == "linear"
    pattern = stages[0].sparsity if single else None
    for rep in {m.name: m for m in modules}.values():
        try:
            mod = model.get_submodule(rep.name)
        except AttributeError:
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            verify_pruned(rep.name, w.data, pattern, rep.method)
            if w.dim() == 2 and tuple(w.shape) == tuple(rep.shape) and sparsity_of(w.data) < rep.sparsity - 1e-9:
                raise PruneIntegrityError(f"internal error: {rep.name} is {sparsity_of(w.data):.4f} sparse, pruned to "
                                          f"{rep.sparsity:.4f}; nothing was saved")
