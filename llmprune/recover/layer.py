"""Block recovery of one pruned decoder block: which parts are reconstructed, against which dense outputs.

``scope="separate"`` (the default; "A Free Lunch in LLM Compression", 2025, finds reconstructing attention and
MLP separately inside each block nearly the most resource-efficient setting): first the attention linears,
so the attention module's output matches the dense attention output on the same inputs; then the remaining
linears (the MLP), running the whole block with the recovered attention, against the dense block output.
``scope="whole"``: all linears at once against the dense block output. Blocks without a recognisable
attention module (:func:`llmprune.model.access.attn_of`) are reconstructed whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

from torch import nn

from llmprune.config import PruneConfig, RecoveryConfig
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.model.access import attn_of
from llmprune.recover.batches import Schedule, slice_rows
from llmprune.recover.block import AllReduce, PartResult, reconstruct
from llmprune.recover.capture import DenseBatch, first_tensor


def check_recovery(cfg: RecoveryConfig | None, stages: Sequence[PruneConfig], kinds: Sequence[str]) -> None:
    """A recovery config fits the prune stages: one per-linear stage, N:M for a learned mask.

    Args:
        kinds: each stage's method kind (``"linear"`` or ``"model"``).

    Raises:
        ConfigError: naming the field.
    """
    if cfg is None:
        return
    if len(stages) != 1 or kinds[0] != "linear":
        raise ConfigError("recover: needs exactly one prune stage of a per-linear method (magnitude, wanda, "
                          "sparsegpt, ...)")
    if cfg.mask == "learn" and not stages[0].sparsity.is_nm:
        raise ConfigError(f"recover.mask: learn needs an N:M sparsity (got {stages[0].sparsity}); use mask fixed")


def find_attn(layer: nn.Module) -> nn.Module | None:
    """The block's attention module, or None when it has none this code recognises."""
    try:
        return attn_of(layer)
    except LlmpruneError:
        return None


@contextmanager
def training_only(layer: nn.Module, linears: Sequence[nn.Linear]):
    """Inside: only the weights of ``linears`` require gradients among ``layer``'s parameters."""
    saved = [(p, p.requires_grad) for p in layer.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for lin in linears:
            lin.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


def parts(layer: nn.Module, targets: Mapping[str, nn.Linear], dense: Sequence[DenseBatch],
          scope: str) -> list[tuple[str, dict[str, nn.Linear]]]:
    """``[(part, {name: linear})]`` in reconstruction order; parts without linears are left out."""
    attn = find_attn(layer) if scope == "separate" else None
    if attn is None or any(d.attn_out is None for d in dense):
        return [("block", dict(targets))] if targets else []
    inside = {id(m) for m in attn.modules()}
    a = {n: m for n, m in targets.items() if id(m) in inside}
    rest = {n: m for n, m in targets.items() if id(m) not in inside}
    return [(p, lins) for p, lins in (("attn", a), ("mlp", rest)) if lins]


def recover_block(
    layer: nn.Module,
    targets: Mapping[str, nn.Linear],
    dense: Sequence[DenseBatch],
    cfg: RecoveryConfig,
    stage: PruneConfig,
    *,
    schedule: Schedule | None = None,
    all_reduce: AllReduce | None = None,
    progress: bool = False,
    desc: str = "recover",
) -> dict[str, tuple[PartResult, list[str]]]:
    """Reconstruct the pruned linears ``targets`` of ``layer`` in place against the dense outputs ``dense``.

    Args:
        layer: the pruned decoder block, on its device.
        targets: ``{name in the layer: pruned linear}``.
        dense: the dense pass's recorded batches (:func:`llmprune.recover.capture.record_dense`), one per local
            calibration batch.
        cfg: the recovery options.
        stage: the prune stage (its sparsity pattern).
        schedule, all_reduce: multi-process runs (see :func:`llmprune.recover.block.reconstruct`).
        progress, desc: a progress bar per part.

    Returns:
        ``{part: (result, [names of its linears])}`` in reconstruction order.
    """
    rows = [d.rows for d in dense]
    attn = find_attn(layer)

    def run_block(j: int, lo: int, hi: int):
        d = dense[j]
        return first_tensor(layer(*slice_rows(d.args, d.rows, lo, hi), **slice_rows(d.kwargs, d.rows, lo, hi)))

    def run_attn(j: int, lo: int, hi: int):
        d = dense[j]
        return first_tensor(attn(*slice_rows(d.attn_args, d.rows, lo, hi), **slice_rows(d.attn_kwargs, d.rows, lo, hi)))

    results: dict[str, tuple[PartResult, list[str]]] = {}
    for part, lins in parts(layer, targets, dense, cfg.scope):
        forward = run_attn if part == "attn" else run_block
        if part == "attn":
            def target(j: int, lo: int, hi: int):
                return dense[j].attn_out[lo:hi]
        else:
            def target(j: int, lo: int, hi: int):
                return dense[j].out[lo:hi]
        with training_only(layer, list(lins.values())):
            res = reconstruct(list(lins.values()), forward, target, rows, cfg, pattern=stage.sparsity,
                              schedule=schedule, all_reduce=all_reduce, part=part, progress=progress,
                              desc=f"{desc} {part}")
        results[part] = (res, list(lins))
    return results
