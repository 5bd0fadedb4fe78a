"""Non-uniform sparsity budgets across layers: ratios from importance, kept sizes rounded.

Used by CFSP (:mod:`llmprune.prune.methods.cfsp`) to turn coarse per-layer importance into
per-layer kept sizes. The allocators are pure numbers in, numbers out, so any
importance-driven allocation (e.g. OWL-style outlier ratios) can reuse them;
:func:`plan_structured` reads the sizes off the decoder layers and calls them.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.errors import ConfigError
from llmprune.model.access import intermediate_size, kv_heads, mlp_of
from llmprune.prune.structured import group_params


def layer_ratios(
    importance: list[float] | None,
    total_ratio: float,
    min_ratio: float,
    max_ratio: float,
    weights: list[float],
    power: float = 1.0,
) -> list[float]:
    """Per-layer pruning ratios, weighted mean ``total_ratio``, each in ``[min_ratio, max_ratio]``.

    ``importance=None`` gives the uniform allocation. Otherwise ``r_i = clip(c * imp_i ** -power)``
    with ``c`` found by bisection so that ``sum w_i r_i = total_ratio * sum w_i``.
    """
    n = len(weights)
    if importance is None or power == 0:
        return [total_ratio] * n
    if len(importance) != n:
        raise ValueError(f"{len(importance)} importances for {n} layers")
    imp = torch.tensor(importance, dtype=torch.float64).clamp_min(1e-6)
    raw = imp.pow(-power)
    w = torch.tensor(weights, dtype=torch.float64)
    target = total_ratio * float(w.sum())

    def total(c: float) -> float:
        return float((w * (c * raw).clamp(min_ratio, max_ratio)).sum())

    lo, hi = 0.0, 1.0
    while total(hi) < target and hi < 1e12:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    return [float(r) for r in (hi * raw).clamp(min_ratio, max_ratio)]


def round_sizes(ratios: list[float], sizes: list[int], round_to: int, target_removed: int | None = None,
                match_total: bool = True) -> list[int]:
    """Kept sizes ``~ (1 - r_i) * size_i``, multiples of ``round_to`` (or the full size).

    With ``match_total`` the total removed is brought to ``target_removed`` (default ``sum r_i * size_i``) within
    ``round_to / 2`` by moving one ``round_to`` step at a time in the layers whose rounding
    error is largest; without it each layer is rounded on its own. Raises :class:`ConfigError` if a layer
    would be emptied.
    """
    ideal = [(1.0 - r) * s for r, s in zip(ratios, sizes)]
    if target_removed is None:
        target_removed = round(sum(r * s for r, s in zip(ratios, sizes)))
    kept = []
    for i, (want, size) in enumerate(zip(ideal, sizes)):
        k = size if want >= size - round_to / 2 else int(round(want / round_to)) * round_to
        if k <= 0:
            raise ConfigError(
                f"layer {i} would be empty: keeping {want:.1f} of {size} channels rounds to 0 "
                f"(round_to={round_to}); lower the sparsity or max_ratio"
            )
        kept.append(min(k, size))
    if not match_total:
        return kept
    target_kept = sum(sizes) - target_removed
    for _ in range(10 * len(sizes) + 10):
        excess = sum(kept) - target_kept
        if abs(excess) <= round_to / 2:
            break
        if excess > 0:  # remove a step where we kept the most above the ideal
            cands = [i for i in range(len(kept)) if kept[i] - round_to > 0]
            if not cands:
                break
            i = max(cands, key=lambda j: (kept[j] - ideal[j], -j))
            kept[i] = (kept[i] - round_to) if kept[i] % round_to == 0 else (kept[i] // round_to) * round_to
        else:
            cands = [i for i in range(len(kept)) if kept[i] < sizes[i]]
            if not cands:
                break
            i = min(cands, key=lambda j: (kept[j] - ideal[j], j))
            kept[i] = min(sizes[i], kept[i] + round_to)
    return kept


def uniform_sizes(ratio: float, sizes: list[int], round_to: int) -> list[int]:
    """Kept sizes for the uniform allocation: each ``(1 - ratio) * size`` rounded to a multiple of ``round_to``
    on its own (no total matching), so layers of one size all keep one size and the model stays loadable by
    plain transformers; the achieved ratio differs from ``ratio`` by at most half a rounding step per layer.

    Raises:
        ConfigError: if a layer would be emptied.
    """
    return round_sizes([ratio] * len(sizes), sizes, round_to, match_total=False)


def allocate_budget(
    importance: list[float] | None,
    total_ratio: float,
    min_ratio: float,
    max_ratio: float,
    round_to: int,
    sizes: list[int],
    power: float = 1.0,
) -> list[int]:
    """Kept FFN sizes per layer: coarse ratios (:func:`layer_ratios`) then rounding (:func:`round_sizes`);
    ``importance=None``: :func:`uniform_sizes`."""
    if importance is None:
        return uniform_sizes(total_ratio, sizes, round_to)
    ratios = layer_ratios(importance, total_ratio, min_ratio, max_ratio, [float(s) for s in sizes], power)
    return round_sizes(ratios, sizes, round_to, round(total_ratio * sum(sizes)))


def allocate_with_groups(
    importance: list[float] | None,
    total_ratio: float,
    min_ratio: float,
    max_ratio: float,
    round_to: int,
    sizes: list[int],
    channel_params: int,
    groups: list[int],
    group_params: list[int],
    power: float = 1.0,
) -> tuple[list[int], list[int]]:
    """Kept channel sizes and kept head groups per layer, when head groups are pruned too.

    Each layer gets one ratio over its channel and head-group parameters (:func:`layer_ratios`);
    whole head groups take it first, the channels absorb the rest, so the removed parameters
    match the budget layer by layer and (after rounding) in total.

    Args:
        sizes: channels per layer (e.g. FFN intermediate sizes), each worth ``channel_params``.
        groups: head groups per layer, each worth ``group_params[i]`` parameters.

    Returns:
        ``(kept_sizes, kept_groups)``.
    """
    layer_params = [channel_params * s + g * gp for s, g, gp in zip(sizes, groups, group_params)]
    ratios = layer_ratios(importance, total_ratio, min_ratio, max_ratio, [float(p) for p in layer_params], power)
    kept_groups, ffn_ratios = [], []
    for i, r in enumerate(ratios):
        g = int(round((1.0 - r) * groups[i]))
        if g <= 0:
            raise ConfigError(f"layer {i} would lose every attention head group at ratio {r:.2f}; lower the sparsity")
        kept_groups.append(g)
        budget = r * layer_params[i] - (groups[i] - g) * group_params[i]
        ffn_ratios.append(min(max(budget / (channel_params * sizes[i]), 0.0), max_ratio))
    if importance is None:  # uniform: every layer rounded alike (one size for layers of one size)
        return round_sizes(ffn_ratios, sizes, round_to, match_total=False), kept_groups
    target = total_ratio * sum(layer_params) - sum((g - k) * gp for g, k, gp in zip(groups, kept_groups, group_params))
    kept = round_sizes(ffn_ratios, sizes, round_to, max(0, round(target / channel_params)))
    return kept, kept_groups


def plan_structured(
    layers: list[nn.Module],
    importance: list[float] | None,
    skip: list[bool],
    total_ratio: float,
    min_ratio: float,
    max_ratio: float,
    round_to: int,
    power: float = 1.0,
    heads: bool = False,
) -> tuple[list[int], list[int] | None]:
    """Kept FFN sizes (and KV head groups when ``heads``) per decoder layer; ``skip``-ped layers stay whole.

    Args:
        layers: decoder layers with a gated MLP (and ``self_attn`` when ``heads``).
        importance: coarse importance per layer (None = uniform allocation).
        skip: layers excluded from pruning (e.g. by ignore patterns); the budget is spread over the rest.

    Returns:
        ``(kept_sizes, kept_groups)``, ``kept_groups`` None when heads are not pruned.
    """
    kept = [intermediate_size(layer) for layer in layers]
    groups = [kv_heads(layer) for layer in layers] if heads else None
    act = [i for i, s in enumerate(skip) if not s]
    if not act:
        raise ConfigError("structured pruning: every layer is excluded by ignore patterns")
    imp = None if importance is None else [importance[i] for i in act]
    opts = (total_ratio, min_ratio, max_ratio, round_to, [kept[i] for i in act])
    if groups is None:
        new = allocate_budget(imp, *opts, power)
    else:
        hidden = mlp_of(layers[0]).gate_proj.in_features
        new, new_groups = allocate_with_groups(imp, *opts, 3 * hidden, [groups[i] for i in act],
                                               [group_params(layers[i]) for i in act], power)
        for i, g in zip(act, new_groups):
            groups[i] = g
    for i, k in zip(act, new):
        kept[i] = k
    return kept, groups
