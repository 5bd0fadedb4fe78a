"""Options of the pattern-keeping recovery stage (:class:`RecoveryConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from llmprune.config.base import check_float, check_int
from llmprune.errors import ConfigError


@dataclass
class RecoveryConfig:
    """Recovery after a per-linear prune stage that keeps the sparsity pattern (:mod:`llmprune.recover`).

    Attributes:
        mode: ``"block"``: inside the layer-by-layer engine, each pruned decoder block's kept weights are
            optimized (Adam) so its outputs match the dense block's on the block's calibration inputs;
            ``"e2e"``: the whole sparse model is distilled from the dense one (logit KL, optional hidden MSE).
        scope: block mode: ``"separate"`` (attention against the dense attention output, then the MLP against
            the dense block output) or ``"whole"`` (all linears of the block at once).
        mask: ``"fixed"`` (the pruned entries stay zero) or ``"learn"`` (N:M only: SR-STE with progressive
            gradient flow; the pattern is re-selected from straight-through dense weights every step).
        steps: Adam steps per reconstructed part (block) or in total (e2e).
        lr: peak Adam learning rate (cosine decay towards 0).
        batch_size: calibration sequences per step.
        decay: ``learn``: SR-STE decay on the pruned entries (added to their gradient, times the weight).
        flow: ``learn``: gradient factor reaching the pruned entries at the first step, decaying linearly to 0.
        hidden_weight: ``e2e``: weight of the per-layer hidden-state MSE next to the logit KL (0 = KL only).
        temperature: ``e2e``: softmax temperature of the logit KL.
        eval_batches: the losses reported before/after each block part are measured on the first this many
            calibration batches (0: all; each measurement is a forward pass over them).
    """

    MODES: ClassVar[tuple[str, ...]] = ("block", "e2e")
    SCOPES: ClassVar[tuple[str, ...]] = ("separate", "whole")
    MASKS: ClassVar[tuple[str, ...]] = ("fixed", "learn")

    mode: str = "block"
    scope: str = "separate"
    mask: str = "fixed"
    steps: int = 128
    lr: float = 2e-4
    batch_size: int = 1
    decay: float = 2e-4
    flow: float = 1.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    eval_batches: int = 2

    def __post_init__(self) -> None:
        for name, allowed in (("mode", self.MODES), ("scope", self.SCOPES), ("mask", self.MASKS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"recover.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_int("recover.steps", self.steps)
        check_float("recover.lr", self.lr, 1e-10, 1.0)
        check_int("recover.batch_size", self.batch_size)
        check_float("recover.decay", self.decay, 0.0, 1.0)
        check_float("recover.flow", self.flow, 0.0, 1.0)
        check_float("recover.hidden_weight", self.hidden_weight, 0.0, 1e6)
        check_float("recover.temperature", self.temperature, 1e-3, 1e3)
        check_int("recover.eval_batches", self.eval_batches, minimum=0)
        if self.mode == "e2e" and self.mask == "learn":
            raise ConfigError("recover.mask: learn is only available with mode block (e2e keeps the mask fixed)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
