"""Wanda: prune by ``|W_ij| * ||X_j||_2`` within each output row.

Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", 2023 (https://arxiv.org/abs/2306.11695). No weight update; the
activation norm comes from one calibration pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from llmprune.config import PruneConfig
from llmprune.sparsity import SparsityPattern, select_mask


@dataclass
class WandaConfig(PruneConfig):
    """Wanda pruning (needs calibration activations)."""

    method: ClassVar[str] = "wanda"


def wanda_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask from Wanda scores.

    Args:
        weight: ``[out, in]``.
        act_sq_norm: ``[in]``, sum over calibration tokens of ``x_j ** 2``
            (any positive scaling gives the same mask).
        pattern: ratio (compared per output row) or N:M along ``in``.

    Returns:
        ``[out, in]`` bool, True = keep.
    """
    if act_sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"act_sq_norm shape {tuple(act_sq_norm.shape)} != ({weight.shape[1]},)")
    score = weight.detach().float().abs() * act_sq_norm.float().sqrt().to(weight.device).unsqueeze(0)
    return select_mask(score, pattern)


def wanda_prune(weight: torch.Tensor, stats: dict, config: WandaConfig):
    mask = wanda_mask(weight, stats["act_sq_norm"], config.sparsity)
    return weight * mask, mask
