"""Allocating a block-level activation sparsity over a decoder block's four input groups (pure numbers).

* uniform: every group at the block's sparsity.
* greedy (TEAL, "Training-Free Activation Sparsity in Large Language Models", Sec. 4.2): start with every group
  dense; at each step try raising each group's sparsity so that the block sparsity grows by ``step`` (weighted
  by the group's weights, :func:`~llmprune.runtime.actsparse.thresholds.group_params`), measure the block's
  output error for each candidate, and keep the one whose error grows least per unit of block sparsity. The
  sequence of choices is a *path*: the allocation at every level ``0, step, 2 step, ..., target``, so one run
  serves every lower target too (interpolated between levels at run time).

``error(sparsities) -> float`` is the caller's (the calibration runs the block with those group sparsities on
calibration inputs and compares with the dense output); nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llmprune.errors import ConfigError

#: A group is never sparsified beyond this (the whole input of a linear zeroed is never a good trade).
MAX_GROUP_SPARSITY = 0.99


def uniform_path() -> tuple[list[float], list[list[float]]]:
    """Levels ``[0, 1]`` and the path where every group follows the level (``[P][4]``)."""
    return [0.0, 1.0], [[0.0] * 4, [1.0] * 4]


def greedy_path(error: Callable[[list[float]], float], params: Sequence[int], target: float, step: float = 0.025,
                max_group: float = MAX_GROUP_SPARSITY) -> tuple[list[float], list[list[float]], list[float]]:
    """TEAL's block-wise greedy allocation up to block sparsity ``target``.

    Args:
        error: block output error of a ``[4]`` list of group sparsities (lower is better).
        params: weights per group (block sparsity = ``sum s_g * params_g / sum params_g``).
        target: block sparsity to reach, in ``(0, 1)``.
        step: block sparsity added per greedy step (the last step is shortened to land on ``target``).
        max_group: upper bound of any group's sparsity.

    Returns:
        ``(levels [P], path [P][4], errors [P])``: block sparsity, group sparsities and error after each step
        (``levels[0] == 0`` with every group dense, error ``error([0, 0, 0, 0])``).

    Raises:
        ConfigError: on a bad target/step, or a target the groups cannot reach under ``max_group``.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"greedy allocation: target must be in (0, 1), got {target!r}")
    if not 0.0 < step <= 1.0:
        raise ConfigError(f"greedy allocation: step must be in (0, 1], got {step!r}")
    total = float(sum(params))
    if len(params) == 0 or total <= 0 or any(p < 0 for p in params):
        raise ConfigError(f"greedy allocation: params must be non-negative with a positive sum, got {list(params)}")
    weight = [p / total for p in params]
    s = [0.0] * len(params)
    cur_err = float(error(s))
    levels, path, errors = [0.0], [list(s)], [cur_err]
    level = 0.0
    while level < target - 1e-9:
        want = min(step, target - level)
        best = None
        for g, w in enumerate(weight):
            room = (max_group - s[g]) * w
            if w <= 0 or room <= 1e-12:
                continue
            gain = min(want, room)
            cand = list(s)
            cand[g] = min(max_group, s[g] + gain / w)
            err = float(error(cand))
            score = (err - cur_err) / gain
            if best is None or score < best[0]:
                best = (score, cand, err, gain)
        if best is None:
            raise ConfigError(f"greedy allocation: cannot reach block sparsity {target} with every group <= {max_group}")
        _, s, cur_err, gain = best
        level += gain
        levels.append(level)
        path.append(list(s))
        errors.append(cur_err)
    if abs(levels[-1] - target) < 1e-6:  # float steps: land exactly on the target
        levels[-1] = target
    return levels, path, errors
