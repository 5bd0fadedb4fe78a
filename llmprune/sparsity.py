"""Sparsity patterns: parsing, mask selection and checks, in one place.

Conventions used everywhere in llmprune:

* A *mask* is a ``torch.bool`` tensor shaped like the weight, ``True`` = keep.
* Scores are "importance": the lowest scores are pruned.
* ``"N:M"`` keeps ``N`` of every ``M`` consecutive weights along the input
  dimension (the last dim of a ``[out, in]`` linear weight), so ``"2:4"`` is
  50% sparse and matches NVIDIA's sparse tensor cores.
* An unstructured ratio ``0.5`` prunes that fraction of weights, selected
  *per output row* (Wanda's comparison group) unless a method says otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmprune.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by the functions that use it: llmprune.config (and so the CLI's --help,
    import torch  # whose flags come from the config dataclasses) imports SparsityPattern without torch

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """A target sparsity: unstructured ratio or N:M.

    Attributes:
        ratio: fraction of weights removed, in (0, 1).
        n: kept weights per group (N:M only).
        m: group size (N:M only).
    """

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @classmethod
    def parse(cls, value: str | float | SparsityPattern) -> SparsityPattern:
        """Parse ``"2:4"``, ``"4:8"``, ``"0.5"`` or ``0.5``.

        Raises:
            ConfigError: on anything else, with a message naming the value.
        """
        if isinstance(value, SparsityPattern):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"invalid sparsity {value!r}: expected a ratio in (0, 1) or N:M")
        if isinstance(value, int) and value > 1:
            # PyYAML reads an unquoted 2:4 as the base-60 integer 124.
            raise ConfigError(
                f"invalid sparsity {value!r}: expected a ratio in (0, 1) or an N:M string "
                "(quote N:M patterns in YAML, e.g. sparsity: \"2:4\")"
            )
        if isinstance(value, str):
            match = _NM_RE.match(value)
            if match:
                n, m = int(match.group(1)), int(match.group(2))
                if not 0 < n < m:
                    raise ConfigError(f"invalid sparsity {value!r}: N:M needs 0 < N < M (e.g. 2:4)")
                return cls(ratio=1.0 - n / m, n=n, m=m)
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(
                    f"invalid sparsity {value!r}: expected a ratio in (0, 1) such as 0.5, or N:M such as 2:4"
                ) from None
        ratio = float(value)
        if not (0.0 < ratio < 1.0) or math.isnan(ratio):
            raise ConfigError(f"invalid sparsity {value!r}: a ratio must lie strictly between 0 and 1")
        return cls(ratio=ratio)


def per_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the ``floor(in * ratio)`` lowest scores of every row.

    Args:
        score: ``[out, in]`` importance.
        ratio: fraction to prune per row.

    Returns:
        ``[out, in]`` bool keep-mask with exactly ``in - floor(in*ratio)`` True per row.
    """
    import torch

    cols = score.shape[-1]
    k = int(cols * ratio)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=-1, largest=False).indices
        mask.scatter_(-1, idx, False)
    return mask


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` largest ``|x|`` along the last dimension (e.g. per KV-cache token and head).

    Args:
        x: ``[..., d]`` values (their magnitude is the score).
        k: entries kept per last-dim vector, ``1 <= k <= d``.

    Returns:
        bool mask shaped like ``x`` with exactly ``k`` True per vector.
    """
    import torch

    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if k == d:
        return torch.ones_like(x, dtype=torch.bool)
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores of a 1-D ``score``, ascending (structured pruning's kept channels).

    Ties go to the lower index, so the choice is deterministic.

    Args:
        score: ``[n]`` importance per channel / head group.
        k: how many to keep, ``1 <= k <= n``.

    Returns:
        ``[k]`` sorted LongTensor.
    """
    import torch

    if not 0 < k <= score.numel():
        raise ConfigError(f"cannot keep {k} of {score.numel()} channels")
    order = torch.argsort(score.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def tensor_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the ``floor(numel * ratio)`` lowest scores of the whole tensor.

    Args:
        score: importance of any shape.
        ratio: fraction to prune.

    Returns:
        bool keep-mask shaped like ``score``.
    """
    import torch

    flat = score.reshape(-1)
    k = int(flat.numel() * ratio)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, largest=False).indices] = False
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive columns.

    Args:
        score: ``[out, in]`` importance; ``in`` must be a multiple of ``m``.

    Returns:
        ``[out, in]`` bool keep-mask.

    Raises:
        ValueError: if ``in`` is not a multiple of ``m``.
    """
    import torch

    rows, cols = score.shape[-2], score.shape[-1]
    if cols % m:
        raise ValueError(f"input dim {cols} is not a multiple of M={m}; cannot apply {n}:{m} sparsity")
    # topk rather than a ranking with a fixed positional tie rule: quantized weights tie often, and a rule such as
    # "the earlier column wins" would prune the same positions of every tied group, which hurts magnitude pruning
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.view(rows, cols)


def select_mask(score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask for ``pattern`` from ``[out, in]`` scores (per row for ratios)."""
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    return per_row_mask(score, pattern.ratio)


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True iff every group of ``m`` consecutive entries of each row keeps at most ``n``."""
    import torch

    rows, cols = mask.shape[-2], mask.shape[-1]
    if cols % m:
        return False
    return bool((mask.reshape(rows, cols // m, m).sum(-1, dtype=torch.int16) <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight == 0).sum().item()) / max(weight.numel(), 1)
