"""SparseGPT: OBS-style mask selection with reconstruction of the kept weights.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", 2023 (https://arxiv.org/abs/2301.00774).

For each linear, with ``H = 2 X^T X / n`` from the layer inputs, columns are
processed left to right in blocks; inside a block the mask is picked by the
OBS saliency ``w^2 / [H^-1]_jj^2`` (for N:M: per group of M columns when the
group starts), and each pruned weight's error is spread over the not yet
processed columns through the upper Cholesky factor of ``H^-1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from llmprune.config import PruneConfig, check_float, check_int
from llmprune.sparsity import SparsityPattern, tensor_mask

log = logging.getLogger(__name__)


@dataclass
class SparseGPTConfig(PruneConfig):
    """SparseGPT options.

    Attributes:
        blocksize: columns per lazy-update block (a multiple of M for N:M).
        percdamp: dampening added to ``diag(H)``, as a fraction of its mean.
    """

    method: ClassVar[str] = "sparsegpt"

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("blocksize", self.blocksize)
        check_float("percdamp", self.percdamp, 0.0, 1.0)
        if self.sparsity.is_nm and self.blocksize % self.sparsity.m:
            from llmprune.errors import ConfigError

            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m}")


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*I)^-1``; raises damping if H is not PD."""
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    mean_diag = torch.mean(torch.diag(hessian)).clamp_min(1e-8)
    damp = percdamp
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(hessian + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            damp = max(damp * 10, 1e-4)
            log.warning("Hessian not positive definite; retrying SparseGPT with damping %.0e", damp)
    raise RuntimeError("SparseGPT: Hessian is not positive definite even with heavy damping")


def sparsegpt_prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight matrix and update the kept weights.

    Args:
        weight: ``[out, in]`` (any float dtype; math runs in fp32).
        hessian: ``[in, in]`` ``X^T X`` (scaled) of the layer inputs.
        pattern: ratio (selected per block of columns over all rows) or N:M.
        blocksize: columns per block.
        percdamp: relative dampening.

    Returns:
        ``(new_weight, keep_mask)``: the updated weight in ``weight.dtype`` with
        zeros at pruned positions, and the ``[out, in]`` bool keep-mask.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} != ({cols}, {cols})")
    if pattern.is_nm and cols % pattern.m:
        raise ValueError(f"input dim {cols} is not a multiple of M={pattern.m}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp)

    prune = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = ~tensor_mask(W1**2 / d.unsqueeze(0) ** 2, pattern.ratio)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                drop = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    keep = ~prune
    return (W * keep).to(weight.dtype), keep


def sparsegpt_prune(weight: torch.Tensor, stats: dict, config: SparseGPTConfig):
    return sparsegpt_prune_weight(weight, stats["hessian"], config.sparsity, config.blocksize, config.percdamp)
