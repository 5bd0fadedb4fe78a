"""Magnitude pruning: drop the smallest ``|W|`` per output row or N:M group.

The data-free baseline every pruning paper compares against
(Han et al. 2015, https://arxiv.org/abs/1506.02626).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from llmprune.config import PruneConfig
from llmprune.sparsity import SparsityPattern, select_mask


@dataclass
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning (no calibration data needed)."""

    method: ClassVar[str] = "magnitude"


def magnitude_mask(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask from ``|W|``.

    Args:
        weight: ``[out, in]``.
        pattern: unstructured ratio (per row) or N:M along ``in``.

    Returns:
        ``[out, in]`` bool, True = keep.
    """
    return select_mask(weight.detach().float().abs(), pattern)


def magnitude_prune(weight: torch.Tensor, stats: dict, config: MagnitudeConfig):
    mask = magnitude_mask(weight, config.sparsity)
    return weight * mask, mask
