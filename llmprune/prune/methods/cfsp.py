"""CFSP-style coarse-to-fine structured pruning: a genuinely smaller dense model.

CFSP (Wang et al., 2024, https://arxiv.org/abs/2409.13199), from one layer-by-layer pass
of the dense model on calibration data (:mod:`llmprune.calibration.blockstats`):

* **coarse**: layers whose output moves little from their input (small angular distance)
  get a larger share of the budget (:func:`llmprune.prune.allocation.layer_ratios`);
* **fine**: inside a layer, FFN channels / KV head groups with the lowest Wanda-style
  ``sum |W| * ||X||`` (:func:`channel_scores`, :func:`head_group_scores`) are *physically
  removed* (:mod:`llmprune.prune.structured`).

**Prunable parameters** are the FFN weights of every decoder layer (``3 * hidden`` per
channel) and, with ``prune_heads``, ``q/k/v/o_proj``; ``sparsity=0.3`` removes 30% of them.
Embeddings, ``lm_head`` and norms are never pruned. Each :class:`ModuleReport` records the
original shape and the fraction removed. Optional LoRA recovery: :mod:`llmprune.prune.recovery`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmprune.calibration.blockstats import LayerStats, collect_stats
from llmprune.config import PruneConfig, check_float, check_int
from llmprune.errors import ConfigError
from llmprune.model.access import attn_of, decoder_layers, decoder_layers_path, kv_heads, matches_any, mlp_of
from llmprune.model.structured import sync_config
from llmprune.prune.allocation import plan_structured
from llmprune.prune.recovery import RecoveryOptions, lora_ranks, recover
from llmprune.prune.report import ModuleReport
from llmprune.prune.structured import prune_head_groups, prune_mlp_channels
from llmprune.sparsity import SparsityPattern, top_indices

log = logging.getLogger(__name__)


@dataclass
class CFSPConfig(RecoveryOptions, PruneConfig):
    """CFSP structured pruning (recovery fields: :class:`~llmprune.prune.recovery.RecoveryOptions`).

    Attributes:
        sparsity: fraction of the prunable parameters removed (a ratio; N:M is an error).
        prune_heads: also remove attention head groups (a KV head and its query heads).
        min_ratio: lowest per-layer pruning ratio.
        max_ratio: highest per-layer pruning ratio (< 1: no layer is emptied).
        round_to: kept FFN sizes are multiples of this (hardware-friendly shapes).
        allocation: ``"coarse"`` (angular-distance budget) or ``"uniform"`` (same ratio everywhere).
        power: sharpness of the coarse allocation (ratio ~ importance ** -power).
        ignore: module-name patterns; a layer any of whose prunable linears matches is left whole.
    """

    method: ClassVar[str] = "cfsp"

    sparsity: SparsityPattern | str | float = 0.2
    prune_heads: bool = False
    min_ratio: float = 0.0
    max_ratio: float = 0.8
    round_to: int = 8
    allocation: str = "coarse"
    power: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity.is_nm:
            raise ConfigError(
                f"cfsp removes whole channels: sparsity must be a ratio such as 0.3, not N:M ({self.sparsity}); "
                "combine with an N:M method in a later recipe stage instead"
            )
        if not isinstance(self.prune_heads, bool):
            raise ConfigError(f"prune_heads must be true or false, got {self.prune_heads!r}")
        for name, lo, hi in (("min_ratio", 0.0, 1.0), ("max_ratio", 0.0, 0.999), ("power", 0.0, 10.0)):
            check_float(name, getattr(self, name), lo, hi)
        check_int("round_to", self.round_to)
        self.check_recovery()
        if self.allocation not in ("coarse", "uniform"):
            raise ConfigError(f"allocation must be 'coarse' or 'uniform', got {self.allocation!r}")
        if not self.min_ratio <= self.sparsity.ratio <= self.max_ratio:
            raise ConfigError(f"sparsity {self.sparsity.ratio:g} must lie in [min_ratio, max_ratio] = "
                              f"[{self.min_ratio:g}, {self.max_ratio:g}]")


def _normalised(score: torch.Tensor) -> torch.Tensor:
    return score / score.sum().clamp_min(1e-12)


def channel_scores(
    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, x_sq: torch.Tensor, h_sq: torch.Tensor
) -> torch.Tensor:
    """Fine importance of each FFN channel.

    Args:
        w_gate, w_up: ``[inter, hidden]``; w_down: ``[hidden, inter]``.
        x_sq: ``[hidden]`` mean squared MLP input per channel.
        h_sq: ``[inter]`` mean squared ``down_proj`` input per channel.

    Returns:
        ``[inter]``: ``sum_k |Wg_jk| ||x_k|| + sum_k |Wu_jk| ||x_k|| + sum_i |Wd_ij| ||h_j||``,
        each term normalised by its sum over channels.
    """
    xn = x_sq.float().sqrt().to(w_gate.device)
    hn = h_sq.float().sqrt().to(w_gate.device)
    gate = (w_gate.float().abs() * xn).sum(1)
    up = (w_up.float().abs() * xn).sum(1)
    down = w_down.float().abs().sum(0) * hn
    return _normalised(gate) + _normalised(up) + _normalised(down)


def head_group_scores(
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    x_sq: torch.Tensor,
    o_sq: torch.Tensor,
    n_groups: int,
) -> torch.Tensor:
    """Fine importance of each KV head group (GQA: a KV head and the query heads sharing it).

    Args:
        w_q: ``[n_groups * rep * hd, hidden]``; w_k, w_v: ``[n_groups * hd, hidden]``;
        w_o: ``[hidden, n_groups * rep * hd]``.
        x_sq: ``[hidden]`` mean squared attention input; o_sq: ``[n_groups * rep * hd]`` of ``o_proj``'s input.
        n_groups: number of KV heads.

    Returns:
        ``[n_groups]``: channel scores as in :func:`channel_scores`, summed per group.
    """
    xn = x_sq.float().sqrt().to(w_q.device)
    on = o_sq.float().sqrt().to(w_q.device)
    terms = [
        (w_q.float().abs() * xn).sum(1),
        (w_k.float().abs() * xn).sum(1),
        (w_v.float().abs() * xn).sum(1),
        w_o.float().abs().sum(0) * on,
    ]
    return sum(_normalised(t).view(n_groups, -1).sum(1) for t in terms)


def cfsp_prune(model: nn.Module, cfg: CFSPConfig, ctx) -> list[ModuleReport]:
    for layer in decoder_layers(model):  # unsupported layouts fail before the calibration pass
        mlp_of(layer)
        if cfg.prune_heads:
            attn_of(layer)
    t0 = time.perf_counter()
    stats = collect_stats(model, ctx.calib, ctx.device, ctx.batch_size, cfg.prune_heads, ctx.progress)
    return apply_cfsp(model, cfg, stats, ctx, stat_seconds=time.perf_counter() - t0)


def apply_cfsp(model: nn.Module, cfg: CFSPConfig, stats: list[LayerStats], ctx, stat_seconds: float = 0.0):
    """Allocate, remove and (optionally) recover, from statistics of :func:`collect_stats`.

    Split from :func:`cfsp_prune` so several sparsities can reuse one calibration pass
    (the statistics come from the dense model and do not depend on the target).
    """
    layers = decoder_layers(model)
    prefix = decoder_layers_path(model)
    names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if cfg.prune_heads:
        names += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    # a layer any of whose prunable linears matches an ignore pattern is left whole
    skip = [any(matches_any(f"{prefix}.{i}.{n}", ctx.ignore) for n in names) for i in range(len(layers))]
    imp = None if cfg.allocation == "uniform" else [st.importance for st in stats]
    kept, kept_groups = plan_structured(layers, imp, skip, cfg.sparsity.ratio, cfg.min_ratio, cfg.max_ratio,
                                        cfg.round_to, cfg.power, cfg.prune_heads)
    reports: list[ModuleReport] = []
    for i, layer in enumerate(layers):
        t1 = time.perf_counter()
        before = {n: tuple(layer.get_submodule(n).weight.shape) for n in names}
        s, mlp = stats[i], mlp_of(layer)
        if kept[i] < mlp.gate_proj.out_features:
            scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, s.mlp_x, s.mlp_h)
            prune_mlp_channels(layer, top_indices(scores, kept[i]).to(mlp.gate_proj.weight.device))
        if kept_groups is not None and kept_groups[i] < kv_heads(layer):
            a = attn_of(layer)
            scores = head_group_scores(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                                       s.attn_x, s.attn_o, kv_heads(layer))
            prune_head_groups(layer, top_indices(scores, kept_groups[i]))
        secs = time.perf_counter() - t1 + stat_seconds / len(layers)
        for name, shape in before.items():
            removed = 1.0 - layer.get_submodule(name).weight.numel() / (shape[0] * shape[1])
            reports.append(ModuleReport(f"{prefix}.{i}.{name}", i, shape, removed, secs / len(names), "cfsp"))
    sync_config(model)
    log.info("cfsp: kept FFN sizes %s; kept KV groups %s", kept, kept_groups)
    total = sum(r.shape[0] * r.shape[1] for r in reports)
    achieved = sum(r.sparsity * r.shape[0] * r.shape[1] for r in reports) / max(total, 1)
    log.info("cfsp (%s): removed %.2f%% of the prunable parameters (target %.2f%%; kept sizes are multiples of %d)",
             cfg.allocation, 100 * achieved, 100 * cfg.sparsity.ratio, cfg.round_to)
    if cfg.recover_steps > 0:
        ranks = [0 if skip[i] else r for i, r in enumerate(lora_ranks([s.importance for s in stats], cfg.lora_rank))]
        recover(model, ctx.calib, ranks, cfg.recover_steps, cfg.recover_lr, cfg.recover_batch_size, ctx.device,
                ctx.progress)
    return reports
