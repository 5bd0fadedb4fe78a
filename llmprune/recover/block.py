"""Reconstruct a pruned part of a decoder block: Adam on its kept weights against the dense outputs.

Block-wise reconstruction as in EBFT (Guo et al., 2024, "EBFT: Effective and Block-Wise Fine-Tuning for Sparse
LLMs", https://arxiv.org/abs/2402.12419) and Wanda++'s regional optimization (Yang et al., 2025,
https://arxiv.org/abs/2503.04992): minimize the error of ``f_sparse(x)`` against ``f_dense(x)`` over the block's
calibration inputs ``x``, where ``f`` is the attention module or the whole block.

Losses (``RecoveryConfig.loss``), over the ``[b, s, h]`` outputs ``y`` (sparse) and ``t`` (dense):

* ``mse``: ``sum((y - t)^2) / (b * s * h)``.
* ``token``: per-token relative squared error, ``mean over the b * s tokens of ||y - t||^2 / ||t||^2`` (norms over
  the hidden dimension). LLMs put massive activations on a few tokens (the attention sink at position 0: Sun et
  al., 2024, "Massive Activations in Large Language Models", https://arxiv.org/abs/2402.17762); under ``mse`` their
  error, hundreds of times the others', is most of the loss and Adam spends the steps matching them. Relative to
  each token's own norm every token weighs the same. (Measured on SmolLM2-135M 2:4 it is not better than ``mse``
  in perplexity: eval/results/recovery.md.)

Masks (``RecoveryConfig.mask``):

* ``fixed``: the keep-mask is the pruned weight's non-zeros; gradients are masked and the weights re-masked
  after every step, so the zeros stay zero (Adam never moves an entry whose gradient is always 0).
* ``learn`` (N:M only): SR-STE (Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural
  Networks From Scratch", https://arxiv.org/abs/2102.04010) with progressive gradient flow (Bambhaniya et al.,
  2024, https://arxiv.org/abs/2402.04744): dense fp32 weights ``W~`` are optimized, the forward uses
  ``W~ * nm_mask(|W~|)``, the gradient reaches the pruned entries straight through, scaled by a factor that
  decays linearly from ``flow`` to 0, plus the sparse-refined decay ``decay * W~``. The last mask is
  re-selected from ``W~``, so the result is of the pattern exactly.

The optimizer works on fp32 master copies of the weights (the module's weight, in its own dtype, is written from
them after every step), so a bf16 model is updated with fp32 precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.config import RecoveryConfig
from llmprune.prune.recovery import cosine_lr
from llmprune.recover.batches import Schedule
from llmprune.sparsity import SparsityPattern, nm_mask

#: ``forward(local batch, first row, end row)`` -> the part's output rows ``[rows, s, hidden]``.
Forward = Callable[[int, int, int], torch.Tensor]
#: ``all_reduce(tensors)``: sum every tensor in place over all processes (None: one process).
AllReduce = Callable[[list[torch.Tensor]], None]


@dataclass
class PartResult:
    """Outcome of reconstructing one part (``attn``, ``mlp`` or ``block``) of one decoder block.

    Attributes:
        part: which part.
        loss_before, loss_after: the loss (``RecoveryConfig.loss``) against the dense outputs on the first
            ``RecoveryConfig.eval_batches`` calibration batches, before the first and after the last step.
        steps: optimizer steps taken.
        seconds: wall time.
    """

    part: str
    loss_before: float
    loss_after: float
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return {"loss_before": self.loss_before, "loss_after": self.loss_after, "steps": self.steps,
                "seconds": round(self.seconds, 3)}


#: smallest dense-token squared norm a ``token`` loss divides by (an all-zero target token counts as 1e-12)
TINY = 1e-12


def sq_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed squared error in fp32 (a 0-d tensor)."""
    return (out.float() - target.float()).pow(2).sum()


def loss_terms(out: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """``(summed loss, count)`` of ``out`` against ``target`` (both ``[..., h]``); the loss is their ratio.

    Args:
        kind: ``"mse"`` (sum of squared errors, count the elements) or ``"token"`` (sum over tokens of
            ``||out - target||^2 / ||target||^2`` over the last dimension, count the tokens).

    Returns:
        A 0-d fp32 tensor (with ``out``'s graph) and an int; summing both over batches gives the mean over them all.
    """
    if kind == "mse":
        return sq_error(out, target), target.numel()
    if kind != "token":
        raise ValueError(f"unknown recovery loss {kind!r}")
    t = target.float()
    err = (out.float() - t).pow(2).sum(-1)
    return (err / t.pow(2).sum(-1).clamp_min(TINY)).sum(), err.numel()


@torch.no_grad()
def mean_error(forward: Forward, target: Forward, rows: Sequence[int], all_reduce: AllReduce | None,
               local: Sequence[int] | None = None, kind: str = "mse") -> float:
    """The loss ``kind`` (:func:`loss_terms`) of ``forward`` against ``target`` over the local batches ``local``
    (default all), summed over every process."""
    total = None
    for j in range(len(rows)) if local is None else local:
        r = rows[j]
        ref = target(j, 0, r)
        if total is None:  # on the outputs' device (an NCCL all-reduce needs CUDA tensors)
            total = torch.zeros(2, dtype=torch.float64, device=ref.device)
        loss, count = loss_terms(forward(j, 0, r), ref, kind)
        total[0] += float(loss)
        total[1] += count
    if total is None:
        total = torch.zeros(2, dtype=torch.float64)
    if all_reduce is not None:
        all_reduce([total])
    return float(total[0] / total[1]) if total[1] else 0.0


def _keep(master: torch.Tensor, mask: torch.Tensor | None, pattern: SparsityPattern) -> torch.Tensor:
    """The keep-mask in use: the fixed one, or the N:M selection from the dense weights (``learn``)."""
    return mask if mask is not None else nm_mask(master.abs(), pattern.n, pattern.m)


def reconstruct(
    linears: Sequence[nn.Linear],
    forward: Forward,
    target: Forward,
    rows: Sequence[int],
    cfg: RecoveryConfig,
    *,
    pattern: SparsityPattern,
    schedule: Schedule | None = None,
    all_reduce: AllReduce | None = None,
    part: str = "block",
    progress: bool = False,
    desc: str = "recover",
) -> PartResult:
    """Optimize the weights of ``linears`` in place so that ``forward`` matches ``target``.

    Args:
        linears: the pruned linears to train (their weights must have ``requires_grad``; every other
            parameter ``forward`` touches should not, so no gradient is computed for it).
        forward: the sparse part's output rows of a local batch (runs with gradients enabled in the loop).
        target: the dense part's output rows of the same batch.
        rows: sequences in each local batch.
        cfg: steps, learning rate, batch size, mask mode and its schedule.
        pattern: the stage's sparsity pattern (``learn`` re-selects its N:M mask).
        schedule: which batch each step uses (default: this process holds every batch).
        all_reduce: sums gradients (and the loss totals) over processes in place; None for one process.
        part: the reported part name.
        progress: a progress bar over the steps, with the loss.
        desc: its label.

    Returns:
        A :class:`PartResult`. The linears' weights hold the result, of ``pattern`` when ``learn``.
    """
    t0 = time.perf_counter()
    schedule = schedule or Schedule.local(len(rows))
    learn = cfg.mask == "learn"
    if learn and not pattern.is_nm:
        raise ValueError(f"mask learn needs an N:M pattern, got {pattern}")
    # the reported losses: on the first ``eval_batches`` global calibration batches (0: all)
    measured = [j for j, g in enumerate(schedule.batch_ids) if not cfg.eval_batches or g < cfg.eval_batches]
    before = mean_error(forward, target, rows, all_reduce, measured, cfg.loss)
    masters = [lin.weight.detach().float().clone() for lin in linears]
    fixed = [None if learn else lin.weight.detach() != 0 for lin in linears]
    opt = torch.optim.Adam(masters, lr=cfg.peak_lr)
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", leave=False, disable=not progress)
    keeps = [_keep(w, m, pattern) for w, m in zip(masters, fixed)]
    for lin, w, keep in zip(linears, masters, keeps):
        lin.weight.data.copy_(w * keep)
    for t in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.peak_lr, t, cfg.steps)
        for lin in linears:
            lin.weight.grad = None
        at = schedule.at(t, rows, cfg.batch_size)
        if at is not None:
            with torch.enable_grad():
                out, ref = forward(*at), target(*at)
                total, count = loss_terms(out, ref, cfg.loss)
                loss = total / count
                loss.backward()
            bar.set_postfix(loss=f"{float(loss.detach()):.3g}", refresh=False)
        grads = [lin.weight.grad.float() if lin.weight.grad is not None else torch.zeros_like(w)
                 for lin, w in zip(linears, masters)]
        if all_reduce is not None:
            all_reduce(grads)
        flow = cfg.flow * (1.0 - t / cfg.steps)
        for w, g, keep in zip(masters, grads, keeps):
            # fixed: pruned entries get no gradient; learn: a decaying share of it plus SR-STE's decay
            w.grad = torch.where(keep, g, flow * g + cfg.decay * w) if learn else g * keep
        opt.step()
        keeps = [_keep(w, m, pattern) for w, m in zip(masters, fixed)]
        with torch.no_grad():
            for lin, w, keep in zip(linears, masters, keeps):
                if not learn:
                    w.mul_(keep)
                lin.weight.data.copy_(w * keep)
    for lin in linears:
        lin.weight.grad = None
    after = mean_error(forward, target, rows, all_reduce, measured, cfg.loss)
    return PartResult(part, before, after, cfg.steps, time.perf_counter() - t0)
