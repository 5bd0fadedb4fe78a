"""Sensitivity-based KV budgets: greedy (TEAL-style) keep counts that minimise the summed measured error.

Input: for every *unit* (the keys or the values of one layer, or of one KV head) the error of pruning that unit
alone at a few keep counts (:mod:`llmprune.calibration.kv_sensitivity`: KL of the next-token distribution from
the dense model's). Each unit's measurements become an error table over every keep count ``0..d``
(:func:`error_table`: piecewise linear between the measured points, 0 at ``k = d``, made non-increasing in
``k`` and convex), and the allocation minimises ``sum_u err_u(k_u)`` subject to

    ``sum_u cost_u * k_u == total`` (the uniform cache's kept entries, exactly), ``lo <= k_u <= hi``

by :func:`allocate_greedy`: start every unit at ``hi`` and repeatedly take one entry from the unit whose table
rises least by it, until the total is met. On convex tables with equal costs this greedy is exactly optimal
(the marginal costs of each unit are non-decreasing, so the cheapest ``n`` removals are a prefix of every unit's
removals). K and V either share one pool (``joint``: only the sum of K and V entries is fixed, so a model whose
keys are more fragile than its values keeps more of its keys) or get separate pools with the uniform K and V
totals. Every kept entry costs the same bytes in the bitmap cache, so the cache bytes equal the uniform cache's
in both cases.
"""

from __future__ import annotations

import heapq
import math

from llmprune.errors import ConfigError
from llmprune.formats.bitmap import keep_count
from llmprune.runtime.kvcache.budgets import KVBudgets


def _lower_convex_hull(values: list[float]) -> list[float]:
    """The largest convex function (in the index) below ``values``, evaluated at every index."""
    hull: list[int] = []
    for i in range(len(values)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord a-i: drop it.
            if (values[b] - values[a]) * (i - a) >= (values[i] - values[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    out = [0.0] * len(values)
    for a, b in zip(hull, hull[1:]):
        for i in range(a, b + 1):
            out[i] = values[a] + (values[b] - values[a]) * (i - a) / (b - a)
    if len(hull) == 1:
        out[hull[0]] = values[hull[0]]
    return out


def error_table(keeps: list[int], errors: list[float], head_dim: int) -> list[float]:
    """Error at every keep count ``0..head_dim`` from errors measured at ``keeps`` (module doc).

    Piecewise linear through ``(head_dim, 0)`` and the measured points; below the smallest measured keep count
    the last segment's slope continues. Then the table is made non-increasing in ``k`` (more entries kept never
    costs more) and replaced by its lower convex hull, so the greedy's marginal costs are monotone.

    Raises:
        ConfigError: on mismatched lengths, keep counts outside ``[1, head_dim)`` or non-finite errors.
    """
    if len(keeps) != len(errors) or not keeps:
        raise ConfigError("sensitivity: need one error per measured keep count")
    if any(not 1 <= k < head_dim for k in keeps) or len(set(keeps)) != len(keeps):
        raise ConfigError(f"sensitivity: keep counts must be distinct, in [1, {head_dim}), got {keeps}")
    if any(isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) for e in errors):
        raise ConfigError(f"sensitivity: errors must be finite numbers, got {errors}")
    pts = sorted(zip(keeps, (max(0.0, float(e)) for e in errors))) + [(head_dim, 0.0)]
    table = []
    for k in range(head_dim + 1):
        j = next((i for i in range(len(pts) - 1) if pts[i][0] <= k <= pts[i + 1][0]), 0 if k < pts[0][0] else None)
        (k0, e0), (k1, e1) = pts[j], pts[j + 1]
        table.append(e0 + (e1 - e0) * (k - k0) / (k1 - k0))
    for k in range(head_dim - 1, -1, -1):  # non-increasing in k
        table[k] = max(table[k], table[k + 1])
    return _lower_convex_hull(table)


def allocate_greedy(tables: list[list[float]], total: int, lo: int, hi: int,
                    costs: list[int] | None = None) -> list[int]:
    """Keep counts ``k_u in [lo, hi]`` with ``sum cost_u * k_u == total`` minimising ``sum tables[u][k_u]``.

    Greedy removal from ``hi`` (module doc); ties go to the lower unit index. Optimal for convex tables with
    equal costs; with unequal costs the removal with the least error per removed entry is taken while it fits.

    Args:
        tables: ``[units][0..d]`` errors (index = keep count).
        total: entries to keep in all.
        lo, hi: bounds of every unit's keep count.
        costs: entries per unit step (e.g. the KV heads of a layer unit); default 1.

    Raises:
        ConfigError: if the total cannot be met within the bounds.
    """
    n = len(tables)
    costs = [1] * n if costs is None else list(costs)
    if len(costs) != n or any(c < 1 for c in costs):
        raise ConfigError("allocate_greedy: one cost >= 1 per unit")
    if not 0 <= lo <= hi or any(len(t) <= hi for t in tables):
        raise ConfigError(f"allocate_greedy: bad bounds {lo}..{hi} for tables of {min(map(len, tables))} entries")
    keeps = [hi] * n
    left = sum(c * hi for c in costs) - total
    if left < 0 or sum(c * lo for c in costs) > total:
        raise ConfigError(f"cannot keep {total} entries with {n} units of {lo}..{hi}")
    heap = [((tables[u][hi - 1] - tables[u][hi]) / costs[u], u) for u in range(n) if hi > lo]
    heapq.heapify(heap)
    skipped = []
    while left > 0 and heap:
        _, u = heapq.heappop(heap)
        if costs[u] > left:  # does not fit any more (unequal costs only)
            skipped.append(u)
            continue
        keeps[u] -= 1
        left -= costs[u]
        if keeps[u] > lo:
            k = keeps[u]
            heapq.heappush(heap, ((tables[u][k - 1] - tables[u][k]) / costs[u], u))
    if left:
        raise ConfigError(f"allocate_greedy: {left} entries cannot be removed with unit costs {sorted(set(costs))}")
    return keeps


def sensitivity_budgets(k_err: list[list[list[float]]], v_err: list[list[list[float]]], keeps: list[int],
                        head_dim: int, heads: int, sparsity: float, v_sparsity: float | None = None, *,
                        joint: bool = True,
                        min_sparsity: float | None = None, max_sparsity: float | None = None,
                        info: dict | None = None) -> KVBudgets:
    """:class:`KVBudgets` (allocation ``"sensitivity"``) from measured errors, mean sparsity ``sparsity`` exactly.

    Args:
        k_err, v_err: ``[layers][units][len(keeps)]`` (units 1 = a layer's heads share a count, or ``heads``).
        keeps: the measured keep counts.
        head_dim, heads: ``d`` and KV heads per layer.
        sparsity: the mean key sparsity; the kept entries equal the uniform ``keep_count(d, sparsity)`` totals.
        v_sparsity: the mean value sparsity (default ``sparsity``).
        joint: one K+V pool (default: the K+V total is the uniform one, K and V means move apart) or separate
            K and V pools (each at its uniform total).
        min_sparsity, max_sparsity: bounds of any head's sparsity (default 0 and the sparsity of the smallest
            measured keep count, i.e. never beyond what was measured).

    Raises:
        ConfigError: on bounds that exclude the mean or tables of the wrong shape.
    """
    L, U = len(k_err), len(k_err[0]) if k_err else 0
    if not L or len(v_err) != L or U not in (1, heads) or any(len(r) != U for r in (*k_err, *v_err)):
        raise ConfigError(f"sensitivity tables must be [layers][1 or {heads}][keeps], K and V alike")
    v_sparsity = sparsity if v_sparsity is None else v_sparsity
    k_uni, v_uni = keep_count(head_dim, sparsity), keep_count(head_dim, v_sparsity)
    hi = head_dim if min_sparsity is None else keep_count(head_dim, min_sparsity)
    lo = min(keeps) if max_sparsity is None else keep_count(head_dim, max_sparsity)
    if not lo <= min(k_uni, v_uni) <= max(k_uni, v_uni) <= hi:
        raise ConfigError(f"sparsity bounds (keep {lo}..{hi}) must contain the mean sparsities {sparsity}, "
                          f"{v_sparsity}")
    cost = heads // U
    tab = {kind: [error_table(keeps, e, head_dim) for row in errs for e in row]
           for kind, errs in (("k", k_err), ("v", v_err))}
    if joint:
        flat = allocate_greedy(tab["k"] + tab["v"], L * heads * (k_uni + v_uni), lo, hi, [cost] * (2 * L * U))
        got = {"k": flat[: L * U], "v": flat[L * U :]}
    else:
        got = {kind: allocate_greedy(tab[kind], L * heads * u, lo, hi, [cost] * (L * U))
               for kind, u in (("k", k_uni), ("v", v_uni))}

    def per_head(flat: list[int]) -> list[list[int]]:
        rows = [flat[i * U : (i + 1) * U] for i in range(L)]
        return [r * heads if U == 1 else r for r in rows]

    kk, vk = per_head(got["k"]), per_head(got["v"])
    # Joint: K and V means move apart (their average stays the uniform one); separate: the requested mean each.
    means = ([1.0 - sum(map(sum, x)) / (L * heads * head_dim) for x in (kk, vk)] if joint
             else [float(sparsity), float(v_sparsity)])
    mapping = {"joint": joint, "keep_bounds": [lo, hi], "measured_keeps": list(keeps), "units_per_layer": U}
    return KVBudgets(head_dim, kk, vk, means[0], means[1], "sensitivity",
                     {**(info or {}), "mapping": mapping, "requested": [float(sparsity), float(v_sparsity)]})
