"""Statistics accumulators over calibration activations.

Methods declare the statistics they need by name (``stats=("hessian",)`` in
:func:`llmprune.prune.registry.register`); the engine builds one accumulator per
linear from :data:`STATS` and feeds it the linear's inputs through a hook
(:func:`llmprune.calibration.collect.collect`).
Each accumulator holds a running *sum* and a token *count* (so distributed
runs can all-reduce both) and exposes the normalised :meth:`result`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import nn


class Accumulator(Protocol):
    """What every statistic implements: a running ``sum`` over tokens and their ``count``."""

    count: int

    def add(self, x: torch.Tensor) -> None:
        """Add the module inputs ``x`` (``[..., in]``)."""

    def tensors(self) -> list[torch.Tensor]:
        """The running sums (what a distributed reduction adds up)."""

    def result(self) -> torch.Tensor:
        """The normalised statistic."""


#: ``{module name: {statistic name: accumulator}}``: the statistics of one decoder layer's modules.
Accumulators = Mapping[str, Mapping[str, Accumulator]]


_SQ_BLOCK_ELEMS = 1 << 16


class ActSqNorm:
    """Per-input-channel mean of ``x_j ** 2`` over tokens (Wanda's ``||X_j||^2 / n``).

    Result shape: ``[in]``, fp32.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        self.add_term(*self.term(x))

    @staticmethod
    def term(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One batch's contribution ``(sum over tokens of x ** 2 [in], tokens)``; the same for every module
        fed the same input, so :func:`feed_hook` computes it once for them (q/k/v, gate/up)."""
        x = x.detach().reshape(-1, x.shape[-1])
        if x.device.type != "cpu":
            x = x.float()
            return (x * x).sum(0), x.shape[0]
        # On the CPU, row blocks of ~64K elements: the squares stay in cache instead of filling (and
        # page-faulting) a temporary as large as the input, ~2x faster; the sum order differs from one
        # whole-tensor reduction only in fp32 rounding
        total = torch.zeros(x.shape[-1], dtype=torch.float32)
        for part in x.split(max(1, _SQ_BLOCK_ELEMS // x.shape[-1])):
            part = part.float()
            total += (part * part).sum(0)
        return total, x.shape[0]

    def add_term(self, term: torch.Tensor, count: int) -> None:
        self.sum += term
        self.count += count

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum]

    def result(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


class Hessian:
    """``H = 2 X^T X / n`` of the inputs of one linear (SparseGPT's layer Hessian).

    Result shape: ``[in, in]``, fp32.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        self.add_term(*self.term(x))

    @staticmethod
    def term(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One batch's contribution ``(X^T X [in, in], tokens)`` (shared by modules fed the same input)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        # Not a fused ``addmm_``: each batch's contribution is formed on its own and then added, so a
        # distributed run that adds the same per-batch contributions in the same order is bit-identical
        # (see llmprune.calibration.distributed, "exact" reduction).
        return x.t() @ x, x.shape[0]

    def add_term(self, term: torch.Tensor, count: int) -> None:
        self.sum += term
        self.count += count

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum]

    def result(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


STATS = {"act_sq_norm": ActSqNorm, "hessian": Hessian}


def feed_hook(accumulators: Mapping[str, Accumulator], memo: dict | None = None) -> Callable:
    """Forward pre-hook that adds the module's input to every accumulator in ``accumulators`` (name -> acc).

    Args:
        accumulators: ``{statistic name: accumulator}`` of one module.
        memo: shared by the hooks of one batch (cleared by the caller between batches): an accumulator with a
            ``term(x)`` method gets the term already computed for the same input tensor (same object, not
            modified since) by another module's hook, e.g. q/k/v or gate/up of a decoder layer, which all read
            one tensor. The sums are bit-identical to computing it per module.
    """

    def hook(module, args):  # must return None: a value would replace the input
        x = args[0]
        for acc in accumulators.values():
            term_of = getattr(acc, "term", None)
            if memo is None or term_of is None:
                acc.add(x)
                continue
            key = (type(acc), id(x), x._version)
            hit = memo.get(key)
            if hit is None or hit[0] is not x:
                hit = memo[key] = (x, term_of(x))  # x kept alive so its id is not reused within the batch
            acc.add_term(*hit[1])

    return hook


def make_accumulator(name: str, module: nn.Linear, device: torch.device) -> Accumulator:
    """Accumulator ``name`` sized for ``module``'s input features."""
    try:
        cls = STATS[name]
    except KeyError:
        raise ValueError(f"unknown statistic {name!r} (known: {', '.join(STATS)})") from None
    return cls(module.in_features, device)
