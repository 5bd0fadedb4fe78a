"""CFSP-style coarse-to-fine structured pruning: a genuinely smaller dense model.

After CFSP (Wang et al., "CFSP: An Efficient Structured Pruning Framework for LLMs
with Coarse-to-Fine Activation Information", 2024, https://arxiv.org/abs/2409.13199),
from one layer-by-layer forward pass of the dense model on calibration data:

* **coarse** (between blocks): the importance of decoder layer ``i`` is the angular
  distance ``arccos(cos(x_in, x_out)) / pi`` between its input and output hidden
  states, averaged over calibration tokens. Layers that change the residual stream
  little get a larger share of the sparsity budget: the ratio of layer ``i`` is
  proportional to ``importance_i ** -power``, clamped to ``[min_ratio, max_ratio]``
  (water-filling keeps the total on target), kept sizes rounded to ``round_to``;
* **fine** (inside a block): an FFN channel's score is the Wanda-style
  ``sum |W| * ||X||`` over its gate row, up row and down column (each of the three
  terms normalised by its total over the layer); a head group's (one KV head and the
  query heads sharing it) is the same over its q/k/v rows and o columns. The
  lowest-scoring channels / groups are *physically removed*.

**Prunable parameters** are the FFN weights of every decoder layer (``gate_proj``,
``up_proj``, ``down_proj``: ``3 * hidden`` per channel) and, with ``prune_heads``,
the attention projections (``q/k/v/o_proj``). ``sparsity=0.3`` removes 30% of them;
embeddings, ``lm_head`` and norms are never pruned, so the fraction of *all*
parameters removed is smaller. The :class:`~llmprune.calibration.driver.ModuleReport`
of each linear records its original shape and the fraction of it removed, so the
report's overall sparsity is the fraction of the prunable parameters removed.

Optional recovery (``recover_steps > 0``): LoRA adapters on every linear of every
decoder layer, with per-layer rank proportional to the coarse importance (as CFSP
spends its fine-tuning budget), trained on the calibration sequences, then merged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmprune import structured
from llmprune.calibration.driver import ModuleReport, _module_device, capture_layer_inputs, run_layer
from llmprune.calibration.stats import ActSqNorm
from llmprune.config import PruneConfig, _check_float, _check_int
from llmprune.errors import ConfigError
from llmprune.modeling import decoder_layers, decoder_layers_path, matches_any
from llmprune.registry import register
from llmprune.sparsity import SparsityPattern

log = logging.getLogger(__name__)


@dataclass
class CFSPConfig(PruneConfig):
    """CFSP structured pruning.

    Attributes:
        sparsity: fraction of the prunable parameters removed (a ratio; N:M is an error).
        prune_heads: also remove attention head groups (a KV head and its query heads).
        min_ratio: lowest per-layer pruning ratio.
        max_ratio: highest per-layer pruning ratio (< 1: no layer is emptied).
        round_to: kept FFN sizes are multiples of this (hardware-friendly shapes).
        allocation: ``"coarse"`` (angular-distance budget) or ``"uniform"`` (same ratio everywhere).
        power: sharpness of the coarse allocation (ratio ~ importance ** -power).
        recover_steps: LoRA recovery steps after pruning (0 = off).
        recover_lr: LoRA learning rate.
        lora_rank: mean LoRA rank (per layer it follows the coarse importance).
        recover_batch_size: calibration sequences per recovery step.
        ignore: module-name patterns; a layer any of whose prunable linears matches is left whole.
    """

    sparsity: SparsityPattern | str | float = 0.2
    prune_heads: bool = False
    min_ratio: float = 0.0
    max_ratio: float = 0.8
    round_to: int = 8
    allocation: str = "coarse"
    power: float = 1.0
    recover_steps: int = 0
    recover_lr: float = 2e-4
    lora_rank: int = 8
    recover_batch_size: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity.is_nm:
            raise ConfigError(
                f"cfsp removes whole channels: sparsity must be a ratio such as 0.3, not N:M ({self.sparsity}); "
                "combine with an N:M method in a later recipe stage instead"
            )
        if not isinstance(self.prune_heads, bool):
            raise ConfigError(f"prune_heads must be true or false, got {self.prune_heads!r}")
        _check_float("min_ratio", self.min_ratio, 0.0, 1.0)
        _check_float("max_ratio", self.max_ratio, 0.0, 0.999)
        ratio = self.sparsity.ratio
        if not self.min_ratio <= ratio <= self.max_ratio:
            raise ConfigError(
                f"sparsity {ratio:g} must lie in [min_ratio, max_ratio] = [{self.min_ratio:g}, {self.max_ratio:g}]"
            )
        _check_int("round_to", self.round_to)
        if self.allocation not in ("coarse", "uniform"):
            raise ConfigError(f"allocation must be 'coarse' or 'uniform', got {self.allocation!r}")
        _check_float("power", self.power, 0.0, 10.0)
        _check_int("recover_steps", self.recover_steps, minimum=0)
        _check_float("recover_lr", self.recover_lr, 1e-8, 1.0)
        _check_int("lora_rank", self.lora_rank)
        _check_int("recover_batch_size", self.recover_batch_size)


# --------------------------------------------------------------------------- pure cores


def angular_distance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token ``arccos(cos(x_in, x_out)) / pi`` in [0, 1]; inputs ``[..., hidden]``."""
    cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


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


def kept_channels(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, ascending (ties: lower index wins)."""
    if not 0 < n_keep <= scores.numel():
        raise ConfigError(f"cannot keep {n_keep} of {scores.numel()} channels")
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:n_keep]).values


def layer_ratios(
    importance: list[float] | None,
    total_ratio: float,
    min_ratio: float,
    max_ratio: float,
    weights: list[float],
    power: float = 1.0,
) -> list[float]:
    """Per-layer pruning ratios, weighted mean ``total_ratio``, each in ``[min_ratio, max_ratio]``.

    ``importance=None`` gives the uniform allocation. Otherwise ``r_i = clip(c * imp_i ** -power)``
    with ``c`` found by bisection so that ``sum w_i r_i = total_ratio * sum w_i``.
    """
    n = len(weights)
    if importance is None or power == 0:
        return [total_ratio] * n
    if len(importance) != n:
        raise ValueError(f"{len(importance)} importances for {n} layers")
    imp = torch.tensor(importance, dtype=torch.float64).clamp_min(1e-6)
    raw = imp.pow(-power)
    w = torch.tensor(weights, dtype=torch.float64)
    target = total_ratio * float(w.sum())

    def total(c: float) -> float:
        return float((w * (c * raw).clamp(min_ratio, max_ratio)).sum())

    lo, hi = 0.0, 1.0
    while total(hi) < target and hi < 1e12:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    return [float(r) for r in (hi * raw).clamp(min_ratio, max_ratio)]


def round_sizes(ratios: list[float], sizes: list[int], round_to: int, target_removed: int | None = None) -> list[int]:
    """Kept sizes ``~ (1 - r_i) * size_i``, multiples of ``round_to`` (or the full size).

    The total removed is brought to ``target_removed`` (default ``sum r_i * size_i``) within
    ``round_to / 2`` by moving one ``round_to`` step at a time in the layers whose rounding
    error is largest. Raises :class:`ConfigError` if a layer would be emptied.
    """
    ideal = [(1.0 - r) * s for r, s in zip(ratios, sizes)]
    if target_removed is None:
        target_removed = round(sum(r * s for r, s in zip(ratios, sizes)))
    kept = []
    for i, (want, size) in enumerate(zip(ideal, sizes)):
        k = size if want >= size - round_to / 2 else int(round(want / round_to)) * round_to
        if k <= 0:
            raise ConfigError(
                f"layer {i} would be empty: keeping {want:.1f} of {size} channels rounds to 0 "
                f"(round_to={round_to}); lower the sparsity or max_ratio"
            )
        kept.append(min(k, size))
    target_kept = sum(sizes) - target_removed
    for _ in range(10 * len(sizes) + 10):
        excess = sum(kept) - target_kept
        if abs(excess) <= round_to / 2:
            break
        if excess > 0:  # remove a step where we kept the most above the ideal
            cands = [i for i in range(len(kept)) if kept[i] - round_to > 0]
            if not cands:
                break
            i = max(cands, key=lambda j: (kept[j] - ideal[j], -j))
            kept[i] = (kept[i] - round_to) if kept[i] % round_to == 0 else (kept[i] // round_to) * round_to
        else:
            cands = [i for i in range(len(kept)) if kept[i] < sizes[i]]
            if not cands:
                break
            i = min(cands, key=lambda j: (kept[j] - ideal[j], j))
            kept[i] = min(sizes[i], kept[i] + round_to)
    return kept


def allocate_budget(
    importance: list[float] | None,
    total_ratio: float,
    min_ratio: float,
    max_ratio: float,
    round_to: int,
    sizes: list[int],
    power: float = 1.0,
) -> list[int]:
    """Kept FFN sizes per layer: coarse ratios (:func:`layer_ratios`) then rounding (:func:`round_sizes`)."""
    ratios = layer_ratios(importance, total_ratio, min_ratio, max_ratio, [float(s) for s in sizes], power)
    return round_sizes(ratios, sizes, round_to, round(total_ratio * sum(sizes)))


# --------------------------------------------------------------------------- calibration pass


@dataclass
class LayerStats:
    importance: float
    mlp_x: torch.Tensor
    mlp_h: torch.Tensor
    attn_x: torch.Tensor | None = None
    attn_o: torch.Tensor | None = None


def _acc_hook(acc: ActSqNorm):
    def hook(module, args, output):
        acc.add(args[0])

    return hook


@torch.no_grad()
def collect_stats(model: nn.Module, calib: torch.Tensor, device, batch_size: int, heads: bool, progress: bool):
    """One layer-by-layer pass of the (unpruned) model: coarse importance and fine statistics."""
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, calib, device, batch_size)
    out: list[LayerStats] = []
    for idx in tqdm(range(len(layers)), desc="cfsp stats", unit="layer", disable=not progress):
        layer = layers[idx]
        home = _module_device(layer)
        layer.to(device)
        mlp = structured.mlp_of(layer)
        accs = {"mlp_x": ActSqNorm(mlp.gate_proj.in_features, device), "mlp_h": ActSqNorm(mlp.down_proj.in_features, device)}
        mods = {"mlp_x": mlp.gate_proj, "mlp_h": mlp.down_proj}
        if heads:
            attn = structured.attn_of(layer)
            accs["attn_x"] = ActSqNorm(attn.q_proj.in_features, device)
            accs["attn_o"] = ActSqNorm(attn.o_proj.in_features, device)
            mods.update(attn_x=attn.q_proj, attn_o=attn.o_proj)
        handles = [mods[k].register_forward_hook(_acc_hook(accs[k])) for k in accs]
        dist, count = 0.0, 0
        try:
            for b in range(len(inputs)):
                x_in = inputs.hidden[b]
                x_out = run_layer(layer, inputs, b)
                d = angular_distance(x_in, x_out)
                dist += float(d.sum())
                count += d.numel()
                inputs.hidden[b] = x_out
        finally:
            for h in handles:
                h.remove()
        layer.to(home)
        out.append(LayerStats(dist / max(count, 1), **{k: a.result().cpu() for k, a in accs.items()}))
    return out


# --------------------------------------------------------------------------- method


def _plan(stats: list[LayerStats], model: nn.Module, cfg: CFSPConfig, skip: list[bool]):
    """Per-layer kept FFN sizes and kept KV groups (None when heads are not pruned)."""
    layers = decoder_layers(model)
    hidden = structured.mlp_of(layers[0]).gate_proj.in_features
    sizes = [structured.intermediate_size(layer) for layer in layers]
    importance = None if cfg.allocation == "uniform" else [s.importance for s in stats]
    active = [i for i in range(len(layers)) if not skip[i]]
    if not active:
        raise ConfigError("cfsp: every layer is excluded by ignore patterns")
    imp_a = None if importance is None else [importance[i] for i in active]
    ratio = cfg.sparsity.ratio
    if not cfg.prune_heads:
        kept_a = allocate_budget(imp_a, ratio, cfg.min_ratio, cfg.max_ratio, cfg.round_to, [sizes[i] for i in active], cfg.power)
        kept = list(sizes)
        for i, k in zip(active, kept_a):
            kept[i] = k
        return kept, None
    # Heads too: one ratio per layer over its FFN + attention parameters; head groups take it first
    # (whole groups), the FFN absorbs the rest so that the layer's removed parameters match.
    attn = [structured.attn_of(layers[i]) for i in range(len(layers))]
    groups = [structured.kv_heads(layer) for layer in layers]
    group_params = [(a.q_proj.out_features // g) * hidden * 2 + (a.k_proj.out_features // g) * hidden * 2
                    for a, g in zip(attn, groups)]
    layer_params = [3 * hidden * s + g * gp for s, g, gp in zip(sizes, groups, group_params)]
    ratios = layer_ratios(imp_a, ratio, cfg.min_ratio, cfg.max_ratio, [float(layer_params[i]) for i in active], cfg.power)
    kept_groups = list(groups)
    ffn_ratios = []
    for i, r in zip(active, ratios):
        g = int(round((1.0 - r) * groups[i]))
        if g <= 0:
            raise ConfigError(f"layer {i} would lose every attention head group at ratio {r:.2f}; lower the sparsity")
        kept_groups[i] = g
        budget = r * layer_params[i] - (groups[i] - g) * group_params[i]
        ffn_ratios.append(min(max(budget / (3 * hidden * sizes[i]), 0.0), cfg.max_ratio))
    target = ratio * sum(layer_params[i] for i in active) - sum((groups[i] - kept_groups[i]) * group_params[i] for i in active)
    kept_a = round_sizes(ffn_ratios, [sizes[i] for i in active], cfg.round_to, max(0, round(target / (3 * hidden))))
    kept = list(sizes)
    for i, k in zip(active, kept_a):
        kept[i] = k
    return kept, kept_groups


def lora_ranks(importance: list[float], rank: int) -> list[int]:
    """Per-layer LoRA rank proportional to coarse importance, mean ``rank``, at least 1."""
    imp = torch.tensor(importance, dtype=torch.float64).clamp_min(1e-6)
    return [max(1, int(round(float(r)))) for r in rank * imp / imp.mean()]


@register("cfsp", CFSPConfig, kind="model")
def cfsp_prune(model: nn.Module, cfg: CFSPConfig, ctx) -> list[ModuleReport]:
    for layer in decoder_layers(model):  # unsupported layouts fail before the calibration pass
        structured.mlp_of(layer)
        if cfg.prune_heads:
            structured.attn_of(layer)
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
    kept, kept_groups = _plan(stats, model, cfg, skip)
    reports: list[ModuleReport] = []
    for i, layer in enumerate(layers):
        t1 = time.perf_counter()
        mlp = structured.mlp_of(layer)
        before = {n: tuple(getattr(mlp, n).weight.shape) for n in ("gate_proj", "up_proj", "down_proj")}
        if kept[i] < mlp.gate_proj.out_features:
            s = stats[i]
            scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, s.mlp_x, s.mlp_h)
            structured.prune_mlp_channels(layer, kept_channels(scores, kept[i]).to(mlp.gate_proj.weight.device))
        mods = {f"mlp.{n}": (shape, getattr(mlp, n)) for n, shape in before.items()}
        if kept_groups is not None:
            attn = structured.attn_of(layer)
            before_a = {n: tuple(getattr(attn, n).weight.shape) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            groups = structured.kv_heads(layer)
            if kept_groups[i] < groups:
                s = stats[i]
                scores = head_group_scores(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                           attn.o_proj.weight, s.attn_x, s.attn_o, groups)
                structured.prune_head_groups(layer, kept_channels(scores, kept_groups[i]))
            mods.update({f"self_attn.{n}": (shape, getattr(attn, n)) for n, shape in before_a.items()})
        secs = time.perf_counter() - t1 + stat_seconds / len(layers)
        for name, (shape, lin) in mods.items():
            removed = 1.0 - lin.weight.numel() / (shape[0] * shape[1])
            reports.append(ModuleReport(f"{prefix}.{i}.{name}", i, shape, removed, secs / len(mods), "cfsp"))
    structured.sync_config(model)
    log.info("cfsp: kept FFN sizes %s; kept KV groups %s", kept, kept_groups)
    if cfg.recover_steps > 0:
        ranks = [0 if skip[i] else r for i, r in enumerate(lora_ranks([s.importance for s in stats], cfg.lora_rank))]
        recover(model, ctx.calib, ranks, cfg, ctx.device, ctx.progress)
    return reports


# --------------------------------------------------------------------------- LoRA recovery


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B A x`` with a frozen ``base``; ``B`` starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x.float(), self.lora_a), self.lora_b) * self.scale
        return self.base(x) + delta.to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w = self.base.weight
        w.add_((self.lora_b @ self.lora_a * self.scale).to(w.dtype))
        return self.base


def _wrap(layer: nn.Module, rank: int) -> list[LoRALinear]:
    wrapped = []
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank)
                setattr(parent, name, lora)
                wrapped.append(lora)
    return wrapped


def _unwrap(layer: nn.Module) -> None:
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


def recover(model: nn.Module, calib: torch.Tensor, ranks: list[int], cfg: CFSPConfig, device, progress: bool) -> None:
    """Short LoRA fine-tune of the pruned model on the calibration sequences, merged afterwards.

    The whole model runs on ``device`` for these steps (causal-LM loss on the calibration ids).
    """
    layers = decoder_layers(model)
    home = _module_device(model)
    params_state = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params_state:
        p.requires_grad_(False)
    model.to(device)
    loras = []
    for layer, r in zip(layers, ranks):
        if r > 0:
            loras.extend(_wrap(layer, r))
    trainable = [p for m in loras for p in (m.lora_a, m.lora_b)]
    opt = torch.optim.AdamW(trainable, lr=cfg.recover_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for step in tqdm(range(cfg.recover_steps), desc="cfsp recovery", unit="step", disable=not progress):
                idx = torch.randint(0, calib.shape[0], (cfg.recover_batch_size,), generator=g)
                ids = calib[idx].to(device)
                lr = cfg.recover_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.recover_steps))
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                if step == 0 or step + 1 == cfg.recover_steps:
                    log.info("cfsp recovery step %d/%d loss %.4f", step + 1, cfg.recover_steps, loss.item())
    finally:
        for layer in layers:
            _unwrap(layer)
        model.train(was_training)
        for p, req in params_state:
            p.requires_grad_(req)
        model.to(home)
