"""Per-layer gate budgets: block sparsities with a given mean from per-layer scores (pure numbers in and out).

The gates skip the same fraction ``s`` of each query block's causal KV blocks in every layer by default.
UNComp-style (Xiong et al., 2024, "UNComp: Uncertainty-Aware Long-Context Compressor for Efficient Large Language
Model Inference", https://arxiv.org/abs/2410.03090), each layer instead keeps a fraction

    ``keep_l = clip(c * (score_l / max score) ** power, 1 - max_sparsity, 1 - min_sparsity)``

with ``c`` chosen so the keeps average ``1 - mean`` (in units of ``1 / resolution``, by
:func:`~llmprune.runtime.kvcache.budgets.integer_keeps`, so the mean is exact in those units). Scores: the mean
normalized block-attention entropy per layer (:func:`llmprune.calibration.attn_entropy.attention_entropy`).

Direction (``power``): the intuition "a layer that spreads its attention needs more blocks" (``power > 0``) lost
to uniform on SmolLM2-135M at mean 90% (WikiText-2 ppl 47.2 vs 44.9, 10 windows of 2048), while the inverse
(``power = -1``: the concentrated, low-entropy layers keep more, as their few important blocks must all be found)
won (42.5) and held on 10 further windows (eval/results/gates_quality.md). So the default is ``-1``.
"""

from __future__ import annotations

import math

from llmprune.errors import ConfigError
from llmprune.runtime.kvcache.budgets import integer_keeps


def layer_sparsities(scores: list[float], mean: float, *, power: float = -1.0, min_sparsity: float | None = None,
                     max_sparsity: float | None = None, resolution: int = 1000) -> list[float]:
    """Per-layer block sparsities averaging exactly ``mean`` (``power < 0``: higher score = higher sparsity).

    Args:
        scores: one non-negative score per decoder layer (e.g. normalized attention entropy).
        mean: the mean block sparsity, in (0, 1).
        power: sharpness of the mapping (0 = uniform; negative: the *low*-score layers keep more).
        min_sparsity, max_sparsity: bounds of any layer's sparsity (default ``mean - 0.3`` / ``mean + 0.08``,
            within [0, 0.98]).
        resolution: keeps are integers in units of ``1 / resolution``.

    Raises:
        ConfigError: on a mean outside (0, 1), bounds that exclude it, a bad power or bad scores.
    """
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not 0 < mean < 1:
        raise ConfigError(f"the mean gate sparsity must lie strictly between 0 and 1, got {mean!r}")
    if not scores or any(not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in scores):
        raise ConfigError(f"gate budget scores must be finite numbers >= 0, one per layer, got {scores!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        raise ConfigError(f"power must be a finite number, got {power!r}")
    lo_s = max(0.0, mean - 0.3) if min_sparsity is None else min_sparsity
    hi_s = min(0.98, mean + 0.08) if max_sparsity is None else max_sparsity
    if not lo_s <= mean <= hi_s:
        raise ConfigError(f"sparsity bounds [{lo_s}, {hi_s}] must contain the mean sparsity {mean}")
    n = len(scores)
    total = round(n * (1.0 - mean) * resolution)
    lo, hi = math.ceil((1.0 - hi_s) * resolution - 1e-9), math.floor((1.0 - lo_s) * resolution + 1e-9)
    top = max(scores) or 1.0
    weights = [1.0] * n if power == 0 else [(max(x, 1e-6 * top) / top) ** power for x in scores]
    keeps = integer_keeps(weights, total, lo, hi)
    return [1.0 - k / resolution for k in keeps]


def budgets_at(layer_sparsity: list[float] | None, sparsity: float | None) -> list[float] | None:
    """``layer_sparsity`` if its mean is ``sparsity``, else None (budgets hold only for the mean they were made for)."""
    if not layer_sparsity or sparsity is None:
        return None
    return list(layer_sparsity) if abs(sum(layer_sparsity) / len(layer_sparsity) - sparsity) < 1e-6 else None
