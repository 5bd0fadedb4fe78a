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
            ``"e2e"``: the whole sparse model is distilled from the dense one (logit KL, optional hidden MSE);
            ``"block+e2e"``: both, block recovery in the layer loop and then the distillation (``distill_steps``,
            ``distill_lr``).
        scope: block mode: ``"separate"`` (attention against the dense attention output, then the MLP against
            the dense block output) or ``"whole"`` (all linears of the block at once).
        mask: ``"fixed"`` (the pruned entries stay zero) or ``"learn"`` (N:M only: SR-STE with progressive
            gradient flow; the pattern is re-selected from straight-through dense weights every step).
        loss: block mode: ``"mse"`` (mean squared error over all output elements) or ``"token"`` (mean over
            tokens of each token's squared error divided by the dense output token's squared norm, so the few
            massive-activation tokens, e.g. the attention sink, do not dominate; :mod:`llmprune.recover.block`).
            On SmolLM2-135M ``mse`` measured slightly better (eval/results/recovery.md), so it is the default.
        steps: Adam steps per reconstructed part (block) or in total (e2e).
        lr: peak Adam learning rate (cosine decay towards 0); None: :attr:`peak_lr`'s default for the mode
            (block 2e-3, e2e 2e-4).
        batch_size: calibration sequences per step.
        decay: ``learn``: SR-STE decay on the pruned entries (added to their gradient, times the weight).
        flow: ``learn``: gradient factor reaching the pruned entries at the first step, decaying linearly to 0.
        hidden_weight: ``e2e``: weight of the per-layer hidden-state MSE next to the logit KL (0 = KL only).
        temperature: ``e2e``: softmax temperature of the logit KL.
        distill_steps: ``block+e2e``: the distillation's Adam steps (None: ``steps``).
        distill_lr: ``block+e2e``: the distillation's peak learning rate (None: e2e's default, 2e-4).
        distill_nsamples: ``e2e`` / ``block+e2e``: sequences the distillation trains on (None: the calibration
            set). More than the calibration set: the rest are drawn from the same source with the next seed, so
            the distillation sees text the pruning did not (:func:`llmprune.calibration.data.extend_calibration`).
        eval_batches: the losses reported before/after each block part are measured on the first this many
            calibration batches (0: all; each measurement is a forward pass over them).
    """

    MODES: ClassVar[tuple[str, ...]] = ("block", "e2e", "block+e2e")
    SCOPES: ClassVar[tuple[str, ...]] = ("separate", "whole")
    MASKS: ClassVar[tuple[str, ...]] = ("fixed", "learn")
    LOSSES: ClassVar[tuple[str, ...]] = ("mse", "token")

    mode: str = "block"
    scope: str = "separate"
    mask: str = "fixed"
    loss: str = "mse"
    steps: int = 128
    lr: float | None = None
    batch_size: int = 1
    decay: float = 2e-4
    flow: float = 1.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    eval_batches: int = 2
    distill_steps: int | None = None
    distill_lr: float | None = None
    distill_nsamples: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("mode", self.MODES), ("scope", self.SCOPES), ("mask", self.MASKS),
                              ("loss", self.LOSSES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"recover.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_int("recover.steps", self.steps)
        if self.lr is not None:
            check_float("recover.lr", self.lr, 1e-10, 1.0)
        check_int("recover.batch_size", self.batch_size)
        check_float("recover.decay", self.decay, 0.0, 1.0)
        check_float("recover.flow", self.flow, 0.0, 1.0)
        check_float("recover.hidden_weight", self.hidden_weight, 0.0, 1e6)
        check_float("recover.temperature", self.temperature, 1e-3, 1e3)
        check_int("recover.eval_batches", self.eval_batches, minimum=0)
        if self.distill_steps is not None:
            check_int("recover.distill_steps", self.distill_steps)
        if self.distill_lr is not None:
            check_float("recover.distill_lr", self.distill_lr, 1e-10, 1.0)
        if self.distill_nsamples is not None:
            check_int("recover.distill_nsamples", self.distill_nsamples)
            if self.mode == "block":
                raise ConfigError("recover.distill_nsamples belongs to mode e2e or block+e2e (block has no distillation)")
        if self.mode != "block+e2e" and (self.distill_steps is not None or self.distill_lr is not None):
            raise ConfigError("recover.distill_steps / distill_lr belong to mode block+e2e (mode e2e takes steps / lr)")
        if self.mode == "e2e" and self.mask == "learn":
            raise ConfigError("recover.mask: learn is only available with mode block (e2e keeps the mask fixed)")

    #: the peak learning rate per mode when ``lr`` is None. Block: SmolLM2-135M's bf16 weights are ~0.15 in
    #: magnitude, so 2e-4 (EBFT's LLaMA setting, weights ~0.02) barely moves them in 64 steps (Wanda 2:4, 32 x 512
    #: calibration, 32 steps, 20 windows: 294 -> 260 ppl at 2e-4, 153 at 2e-3; eval/results/recovery.md).
    #: ``block+e2e``: its block part's (the distillation's is e2e's).
    DEFAULT_LR: ClassVar[dict[str, float]] = {"block": 2e-3, "e2e": 2e-4, "block+e2e": 2e-3}

    @property
    def peak_lr(self) -> float:
        """``lr``, or the mode's default."""
        return self.DEFAULT_LR[self.mode] if self.lr is None else self.lr

    @property
    def block(self) -> RecoveryConfig | None:
        """The options of block recovery inside the layer loop (this config), or None when the mode has none."""
        return self if self.mode in ("block", "block+e2e") else None

    @property
    def e2e(self) -> RecoveryConfig | None:
        """The options of the distillation after pruning (mode ``e2e``), or None when the mode has none.

        For ``block+e2e``: mode ``e2e`` with ``distill_steps`` / ``distill_lr`` as its steps / lr and the mask
        fixed (a mask learned in the block part is kept).
        """
        if self.mode == "block+e2e":
            return dataclasses.replace(self, mode="e2e", mask="fixed", steps=self.distill_steps or self.steps,
                                       lr=self.distill_lr, distill_steps=None, distill_lr=None,
                                       distill_nsamples=self.distill_nsamples)
        return self if self.mode == "e2e" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
