"""Non-uniform KV-cache budgets: integer keep counts per layer and KV head (pure numbers in, numbers out).

The uniform cache keeps ``k = keep_count(d, s)`` entries of every ``d``-entry key / value vector. A budget
(:class:`KVBudgets`) instead gives every (layer, KV head) its own keep count, separately for K and V, with the
*same total*: ``sum keep[l][h] == layers * heads * k`` exactly. Every kept entry costs the same bytes and the
per-tile metadata does not depend on the keep count, so the cache bytes of a budget equal those of the uniform
cache to the byte, not just its mean sparsity.

Mapping (:func:`allocate_keeps`, UNComp-style, scores = matrix entropies from
:mod:`llmprune.calibration.entropy`): a low-entropy head (energy in few directions, so top-k magnitude pruning
loses little) gets more compression, a high-entropy head less:

    ``keep_i = clip(c * (score_i / max score) ** power, keep_min, keep_max)``

with ``keep_min = keep_count(d, max_sparsity)``, ``keep_max = keep_count(d, min_sparsity)``; ``c`` is found by
bisection so the continuous keeps sum to the uniform total, then the keeps are rounded down and the remaining
units go to the heads with the largest fractional parts (never past ``keep_max``), which hits the total exactly.
``power = 0`` (or no scores) is the uniform allocation. ``per="layer"`` averages the scores over the heads of a
layer first, so all heads of one layer share one keep count.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.errors import ConfigError
from llmprune.formats.bitmap import keep_count

#: File name of a saved allocation (in a checkpoint directory or a sidecar directory).
BUDGETS_FILE = "kv_budgets.json"
FORMAT = "llmprune.kv_budgets"
VERSION = 1


def _check_scores(scores: list[list[float]]) -> None:
    if not scores or not all(isinstance(row, (list, tuple)) and row for row in scores):
        raise ConfigError("KV budget scores must be a non-empty [layers][heads] table")
    heads = len(scores[0])
    if any(len(row) != heads for row in scores):
        raise ConfigError("KV budget scores: every layer must have the same number of heads")
    for row in scores:
        for s in row:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ConfigError(f"KV budget scores must be finite numbers >= 0, got {s!r}")


def integer_keeps(weights: list[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers ``k_i`` in ``[lo, hi]`` with ``sum k_i == total``, ``k_i ~ clip(c * w_i, lo, hi)``.

    Raises:
        ConfigError: if ``total`` is outside ``[n * lo, n * hi]``.
    """
    n = len(weights)
    if not n * lo <= total <= n * hi:
        raise ConfigError(f"cannot keep {total} entries in {n} vectors with {lo}..{hi} each")
    wmax = max(weights) if weights else 0.0
    if wmax <= 0:
        weights = [1.0] * n
        wmax = 1.0

    def ideal(c: float) -> list[float]:
        return [min(hi, max(lo, c * w)) for w in weights]

    lo_c, hi_c = 0.0, 1.0
    while sum(ideal(hi_c)) < total and hi_c < 1e18:
        hi_c *= 2
    for _ in range(200):
        mid = (lo_c + hi_c) / 2
        if sum(ideal(mid)) < total:
            lo_c = mid
        else:
            hi_c = mid
    want = ideal(hi_c)
    keeps = [min(hi, max(lo, int(math.floor(x)))) for x in want]
    # Largest remainder, then (if bisection overshot) smallest remainder back: sum is exactly `total`.
    order = sorted(range(n), key=lambda i: (-(want[i] - keeps[i]), i))
    while sum(keeps) < total:
        for i in order:
            if keeps[i] < hi and sum(keeps) < total:
                keeps[i] += 1
    while sum(keeps) > total:
        for i in reversed(order):
            if keeps[i] > lo and sum(keeps) > total:
                keeps[i] -= 1
    return keeps


def allocate_keeps(
    scores: list[list[float]] | None,
    head_dim: int,
    sparsity: float,
    *,
    layers: int | None = None,
    heads: int | None = None,
    min_sparsity: float | None = None,
    max_sparsity: float | None = None,
    power: float = 1.0,
    per: str = "head",
) -> list[list[int]]:
    """Keep counts ``[layers][heads]`` whose total is exactly that of the uniform ``sparsity`` (module doc).

    Args:
        scores: ``[layers][heads]`` entropies (higher = keep more), or None for the uniform allocation
            (then ``layers`` and ``heads`` give the shape).
        head_dim: ``d``.
        sparsity: the mean sparsity (its uniform keep count ``keep_count(d, sparsity)`` sets the total).
        min_sparsity, max_sparsity: bounds of any head's sparsity (default: ``sparsity`` -0.3 / +0.2, within
            [0, 0.95]).
        power: sharpness of the mapping (0 = uniform).
        per: ``"head"`` (every head its own count) or ``"layer"`` (heads of a layer share the layer's mean score).

    Raises:
        ConfigError: on bad sparsities, bounds that exclude the mean, a bad ``per`` or bad scores.
    """
    k_uni = keep_count(head_dim, sparsity)
    lo_s = max(0.0, sparsity - 0.3) if min_sparsity is None else min_sparsity
    hi_s = min(0.95, sparsity + 0.2) if max_sparsity is None else max_sparsity
    k_max, k_min = keep_count(head_dim, lo_s), keep_count(head_dim, hi_s)
    if not k_min <= k_uni <= k_max:
        raise ConfigError(f"sparsity bounds [{lo_s}, {hi_s}] must contain the mean sparsity {sparsity}")
    if per not in ("head", "layer"):
        raise ConfigError(f"per must be 'head' or 'layer', got {per!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
        raise ConfigError(f"power must be a number >= 0, got {power!r}")
    if scores is None or power == 0:
        if scores is not None:
            _check_scores(scores)
            layers, heads = len(scores), len(scores[0])
        if not layers or not heads:
            raise ConfigError("the uniform allocation needs layers and heads")
        return [[k_uni] * heads for _ in range(layers)]
    _check_scores(scores)
    L, H = len(scores), len(scores[0])
    if per == "layer":
        means = [sum(row) / H for row in scores]
        top = max(means) or 1.0
        keeps = integer_keeps([(m / top) ** power for m in means], L * k_uni, k_min, k_max)
        return [[k] * H for k in keeps]
    flat = [s for row in scores for s in row]
    top = max(flat) or 1.0
    keeps = integer_keeps([(s / top) ** power for s in flat], L * H * k_uni, k_min, k_max)
    return [keeps[i * H : (i + 1) * H] for i in range(L)]


def _check_keeps(name: str, keeps: Any, head_dim: int) -> list[list[int]]:
    if not isinstance(keeps, (list, tuple)) or not keeps or not all(isinstance(r, (list, tuple)) and r for r in keeps):
        raise ConfigError(f"{name} must be a non-empty [layers][heads] table of keep counts")
    heads = len(keeps[0])
    out = []
    for row in keeps:
        if len(row) != heads:
            raise ConfigError(f"{name}: every layer must have {heads} heads")
        for k in row:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= head_dim:
                raise ConfigError(f"{name}: keep counts must be integers in [1, {head_dim}], got {k!r}")
        out.append([int(k) for k in row])
    return out


@dataclass
class KVBudgets:
    """Per-layer, per-KV-head keep counts of K and V for :class:`~llmprune.runtime.kvcache.BitmapKVCache`.

    Attributes:
        head_dim: ``d``.
        k_keep, v_keep: ``[layers][heads]`` entries kept per key / value vector.
        k_sparsity, v_sparsity: the requested mean sparsities (the totals equal their uniform ones).
        allocation: ``"uniform"``, ``"entropy"`` or ``"sensitivity"`` (how the counts were made; the last from
            :func:`llmprune.runtime.kvcache.greedy.sensitivity_budgets`, whose K / V means may differ).
        info: anything else recorded (scores, mapping parameters).
    """

    head_dim: int
    k_keep: list[list[int]]
    v_keep: list[list[int]]
    k_sparsity: float
    v_sparsity: float
    allocation: str = "entropy"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ConfigError(f"KV budgets: head_dim must be an integer >= 1, got {self.head_dim!r}")
        self.k_keep = _check_keeps("k_keep", self.k_keep, self.head_dim)
        self.v_keep = _check_keeps("v_keep", self.v_keep, self.head_dim)
        if (len(self.k_keep), len(self.k_keep[0])) != (len(self.v_keep), len(self.v_keep[0])):
            raise ConfigError("KV budgets: k_keep and v_keep must have the same [layers][heads] shape")
        for name in ("k_sparsity", "v_sparsity"):
            keep_count(self.head_dim, getattr(self, name))  # validates
            setattr(self, name, float(getattr(self, name)))

    @property
    def layers(self) -> int:
        return len(self.k_keep)

    @property
    def heads(self) -> int:
        return len(self.k_keep[0])

    def mean_sparsity(self, kind: str = "k") -> float:
        """``1 - kept / all`` entries of K (``"k"``) or V (``"v"``) over every layer and head."""
        keeps = self.k_keep if kind == "k" else self.v_keep
        return 1.0 - sum(map(sum, keeps)) / (self.layers * self.heads * self.head_dim)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "allocation": self.allocation, "head_dim": self.head_dim,
                "k_sparsity": self.k_sparsity, "v_sparsity": self.v_sparsity,
                "k_keep": self.k_keep, "v_keep": self.v_keep, **({"info": self.info} if self.info else {})}

    @classmethod
    def from_dict(cls, data: Any, where: str = "KV budgets") -> KVBudgets:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where} is not a KV budgets file (format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(f"{where}: unsupported version {data.get('version')!r} (expected {VERSION})")
        try:
            return cls(head_dim=data["head_dim"], k_keep=data["k_keep"], v_keep=data["v_keep"],
                       k_sparsity=data["k_sparsity"], v_sparsity=data["v_sparsity"],
                       allocation=str(data.get("allocation", "entropy")), info=dict(data.get("info") or {}))
        except KeyError as exc:
            raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON (atomically: a temporary sibling, then a rename)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / BUDGETS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path


def budgets_path(ref: str | os.PathLike) -> Path:
    """The budgets file of ``ref``: the file itself, or ``ref/kv_budgets.json`` for a directory."""
    p = Path(ref).expanduser()
    return p / BUDGETS_FILE if p.is_dir() else p


def load_budgets(ref: str | os.PathLike) -> KVBudgets:
    """Read a :class:`KVBudgets` from a JSON file or a directory holding ``kv_budgets.json``.

    Raises:
        ConfigError: when the file is missing or not a valid budgets file.
    """
    path = budgets_path(ref)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"KV allocation {path} does not exist (make one with llmprune calibrate-kv)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"KV allocation {path} is not valid JSON ({exc})") from None
    return KVBudgets.from_dict(data, str(path))


def resolve_allocation(allocation: Any) -> KVBudgets | None:
    """None for the uniform cache (``None`` / ``"uniform"``), else a :class:`KVBudgets` (object, dict or path)."""
    if allocation is None or (isinstance(allocation, str) and allocation == "uniform"):
        return None
    if isinstance(allocation, KVBudgets):
        return allocation
    if isinstance(allocation, dict):
        return KVBudgets.from_dict(allocation)
    if isinstance(allocation, (str, os.PathLike)):
        return load_budgets(allocation)
    raise ConfigError(f"KV allocation must be 'uniform', a KVBudgets or a path, got {type(allocation).__name__}")


def make_budgets(
    k_scores: list[list[float]] | None,
    v_scores: list[list[float]] | None,
    head_dim: int,
    k_sparsity: float,
    v_sparsity: float | None = None,
    *,
    layers: int | None = None,
    heads: int | None = None,
    allocation: str = "entropy",
    info: dict | None = None,
    **mapping: Any,
) -> KVBudgets:
    """:class:`KVBudgets` from K and V scores (:func:`allocate_keeps` for each, same ``mapping`` keywords)."""
    v_sparsity = k_sparsity if v_sparsity is None else v_sparsity
    if allocation == "uniform":
        k_scores = v_scores = None
    k = allocate_keeps(k_scores, head_dim, k_sparsity, layers=layers, heads=heads, **mapping)
    v = allocate_keeps(v_scores, head_dim, v_sparsity, layers=len(k), heads=len(k[0]), **mapping)
    return KVBudgets(head_dim, k, v, k_sparsity, v_sparsity, allocation,
                     {**(info or {}), **({"mapping": mapping} if mapping else {})})
