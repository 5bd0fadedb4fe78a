"""End-to-end sensitivity of every layer's (or KV head's) keys and values to bitmap KV-cache pruning.

For each *unit* (the keys or the values of one layer, or of one KV head of one layer) and each keep count ``k`` of
a small grid, only that unit is pruned (top-``k`` magnitude per vector, through the chunked-cache emulation of
:mod:`llmprune.calibration.kv_emulate`: tokens older than the query's ``window``-token chunk pruned, the chunk
dense), every other layer stays dense, and the cost is the mean KL divergence of the next-token distribution from
the dense model's, in nats per predicted token, on calibration text:

    ``err[u][k] = mean_t KL(p_dense(. | x_<t) || p_u,k(. | x_<t))``

This is the TEAL-style recipe (measure each block's error at several sparsities alone, then allocate greedily
under the mean budget, :func:`llmprune.runtime.kvcache.budgets.allocate_greedy`), with the model's own output
distribution as the error instead of a local reconstruction error, so errors of different layers are comparable
and additive to first order.

Cost: one dense pass, then ``units * len(keeps)`` passes; each pass re-runs only the layers from the pruned one
onwards (the earlier layers replay their cached dense outputs), so the mean cost is about half a forward pass.
Memory: the dense log-probabilities (``nsamples * seqlen * vocab`` fp32) and every layer's dense input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.calibration.capture import capture_layer_inputs, run_layer
from llmprune.calibration.kv_emulate import emulated_kv_cache
from llmprune.model.access import decoder_layers, kv_heads

log = logging.getLogger(__name__)

#: Default keep-count grid as fractions of ``head_dim``; at 64: keep 48, 32, 24, 16, 12, 8, 5, 3 (sparsity 0.25 ..
#: 0.953). Fine around the usual means (0.5-0.8 = keep 32-13), because the greedy allocation lands on measured
#: points (the error table is linear between them): on SmolLM2-135M at mean 0.7 this grid removes 39% of
#: uniform's perplexity increase where keep 24 / 12 / 5 removed 28% (eval/results/kv_budgets.md).
DEFAULT_KEEP_FRACTIONS = (0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.078, 0.047)


@dataclass
class KVSensitivity:
    """Measured pruning cost per unit and keep count (nats of KL per predicted token).

    Attributes:
        keeps: the keep counts measured (descending).
        k, v: ``[layers][units per layer][len(keeps)]`` errors of pruning that layer's keys / values alone;
            units per layer is 1 (``per="layer"``: all KV heads pruned together) or the KV heads.
        head_dim: ``d``.
        heads: KV heads per layer.
        per: ``"layer"`` or ``"head"``.
        window: the cache's dense window used.
        tokens: calibration tokens.
        seconds: wall time.
    """

    keeps: list[int]
    k: list[list[list[float]]] = field(default_factory=list)
    v: list[list[list[float]]] = field(default_factory=list)
    head_dim: int = 0
    heads: int = 0
    per: str = "layer"
    window: int = 32
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"keeps": self.keeps, "k_err": self.k, "v_err": self.v, "head_dim": self.head_dim,
                "heads": self.heads, "per": self.per, "window": self.window, "tokens": self.tokens,
                "seconds": self.seconds, "error": "mean KL(dense || pruned) per predicted token, nats"}

    @classmethod
    def from_dict(cls, data: dict) -> KVSensitivity:
        return cls(keeps=list(data["keeps"]), k=data["k_err"], v=data["v_err"], head_dim=int(data["head_dim"]),
                   heads=int(data["heads"]), per=str(data["per"]), window=int(data["window"]),
                   tokens=int(data.get("tokens", 0)), seconds=float(data.get("seconds", 0.0)))


class _Replay(nn.Module):
    """Stand-in for decoder layer ``i < start``: returns its cached dense output (the batch set before a pass)."""

    def __init__(self, outputs: list[torch.Tensor] | None, tuple_out: bool) -> None:
        super().__init__()
        self.outputs, self.tuple_out, self.batch = outputs, tuple_out, 0

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.outputs is None else self.outputs[self.batch]
        return (out,) if self.tuple_out else out


def keep_grid(head_dim: int, fractions: tuple[float, ...] = DEFAULT_KEEP_FRACTIONS) -> list[int]:
    """Distinct keep counts ``max(1, round(f * d))``, descending, all below ``d``."""
    return sorted({max(1, min(head_dim - 1, round(f * head_dim))) for f in fractions}, reverse=True)


@torch.no_grad()
def kv_sensitivity(model: nn.Module, input_ids: torch.Tensor, device: torch.device, *, keeps: list[int] | None = None,
                   per: str = "layer", window: int = 32, batch_size: int = 1, progress: bool = False,
                   only: list[int] | None = None) -> KVSensitivity:
    """Measure :class:`KVSensitivity` (module doc) on ``input_ids [nsamples, seqlen]`` (model on ``device``).

    Args:
        model: a dense causal LM, already on ``device`` (every pass runs the model's own forward).
        input_ids: calibration token ids, no padding.
        device: where the passes run.
        keeps: keep counts to measure (default :func:`keep_grid`).
        per: ``"layer"`` (a layer's KV heads pruned together) or ``"head"`` (one KV head at a time).
        window: the cache's dense window.
        batch_size: sequences per pass.
        progress: show a progress bar over the layers.
        only: measure only these layers (to split a run over processes); the others get empty rows.

    Raises:
        ValueError: on a bad ``per`` or keep count.
    """
    if per not in ("layer", "head"):
        raise ValueError(f"per must be 'layer' or 'head', got {per!r}")
    t0 = time.perf_counter()
    layers = decoder_layers(model)
    L, H = len(layers), kv_heads(layers[0])
    d = int(model.config.hidden_size // model.config.num_attention_heads)
    d = int(getattr(model.config, "head_dim", None) or d)
    keeps = keep_grid(d) if keeps is None else sorted(set(keeps), reverse=True)
    if not keeps or not all(1 <= k < d for k in keeps):
        raise ValueError(f"keep counts must be in [1, {d}), got {keeps}")
    batches = [b.to(device) for b in input_ids.split(batch_size)]
    # Dense inputs of every layer (the replayed outputs) and the dense log-probabilities.
    inputs = capture_layer_inputs(model, input_ids, device, batch_size)
    layer_in: list[list[torch.Tensor]] = []
    tuple_out = isinstance(layers[0](inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0]), (tuple, list))
    for layer in layers:
        layer_in.append(list(inputs.hidden))
        inputs.hidden = [run_layer(layer, inputs, j) for j in range(len(inputs))]
    dense_lp = [torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1) for b in batches]
    n_pred = sum(lp.shape[0] * (lp.shape[1] - 1) for lp in dense_lp)

    def cost(start: int) -> float:
        """Mean KL of a pass in which layers ``< start`` replay their dense outputs."""
        saved = [layers[i] for i in range(start)]
        replays = [_Replay(layer_in[i + 1] if i == start - 1 else None, tuple_out) for i in range(start)]
        try:
            for i, r in enumerate(replays):
                layers[i] = r
            total = 0.0
            for j, b in enumerate(batches):
                for r in replays:
                    r.batch = j
                lp = torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1)[:, :-1]
                ref = dense_lp[j][:, :-1]
                total += float((ref.exp() * (ref - lp)).sum())
            return max(0.0, total / n_pred)
        finally:
            for i, m in enumerate(saved):
                layers[i] = m

    result = KVSensitivity(keeps=keeps, head_dim=d, heads=H, per=per, window=window,
                           tokens=int(input_ids.numel()))
    iterator = range(L) if only is None else sorted(set(only))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="kv sensitivity", unit="layer")
    units = [None] if per == "layer" else list(range(H))
    result.k, result.v = [[] for _ in range(L)], [[] for _ in range(L)]
    with emulated_kv_cache(model, window) as emu:
        for i in iterator:
            rows = {"k": [], "v": []}
            for kind in ("k", "v"):
                for h in units:
                    errs = []
                    for k in keeps:
                        ks = [k if h is None or hh == h else d for hh in range(H)]
                        emu.set(i, ks if kind == "k" else None, ks if kind == "v" else None)
                        errs.append(cost(i))
                    rows[kind].append(errs)
            emu.clear(i)
            result.k[i], result.v[i] = rows["k"], rows["v"]
            log.info("kv sensitivity layer %d: K %s V %s", i, rows["k"], rows["v"])
    result.seconds = time.perf_counter() - t0
    return result


def merge_sensitivity_parts(parts: list[dict]) -> dict:
    """Merge :meth:`KVSensitivity.to_dict` parts of a split measurement into one (more keeps, layers, sequences).

    A measurement can be split over processes by layer (``only``), by keep count and by calibration sequences.
    Every part may carry ``"samples"`` (a label of its calibration sequences, e.g. ``"1:4"``; default
    ``"0:<calib nsamples>"`` or ``"all"``). Within one sample label every ``(layer, K/V, unit, keep)`` error is
    taken from whichever part measured it (layers a part did not measure have empty rows); across labels the
    errors are averaged weighted by each label's calibration tokens, which is the mean KL per predicted token of
    the pooled sequences (every sequence of a label has the same length). The merged keep counts are those that
    every label measured on every layer (descending).

    Args:
        parts: ``to_dict`` outputs (plus optional ``"samples"``), same model, ``per`` and window.

    Returns:
        A ``to_dict``-style dict (``tokens`` = summed over labels, ``seconds`` summed, ``samples`` = the labels).

    Raises:
        ValueError: on no parts, mismatched shapes / settings, or no keep count measured everywhere.
    """
    if not parts:
        raise ValueError("no sensitivity parts to merge")
    first = parts[0]
    for key in ("head_dim", "heads", "per", "window"):
        if any(p[key] != first[key] for p in parts):
            raise ValueError(f"sensitivity parts differ in {key!r}")
    L = len(first["k_err"])
    if any(len(p["k_err"]) != L or len(p["v_err"]) != L for p in parts):
        raise ValueError("sensitivity parts differ in their number of layers")

    def label(p: dict) -> str:
        n = (p.get("calib") or {}).get("nsamples")
        return str(p.get("samples") or (f"0:{n}" if n else "all"))

    groups: dict[str, dict] = {}
    for p in parts:
        g = groups.setdefault(label(p), {"tokens": int(p.get("tokens", 0)), "err": {}})
        if int(p.get("tokens", 0)) != g["tokens"]:
            raise ValueError(f"sensitivity parts of samples {label(p)!r} differ in tokens")
        for kind in ("k_err", "v_err"):
            for i, row in enumerate(p[kind]):
                for u, errs in enumerate(row):
                    if len(errs) != len(p["keeps"]):
                        raise ValueError("sensitivity part: one error per keep count")
                    for k, e in zip(p["keeps"], errs):
                        g["err"].setdefault((kind, i, u, int(k)), float(e))
    units = max(len(r) for p in parts for r in p["k_err"])
    keeps = None
    for g in groups.values():
        have = {k for (kind, i, u, k) in g["err"]}
        full = {k for k in have if all((kind, i, u, k) in g["err"] for kind in ("k_err", "v_err")
                                       for i in range(L) for u in range(units))}
        keeps = full if keeps is None else keeps & full
    if not keeps:
        raise ValueError("no keep count was measured on every layer of every sample group")
    keeps_sorted = sorted(keeps, reverse=True)
    total = sum(g["tokens"] for g in groups.values())
    weights = [(g["tokens"] / total if total else 1.0 / len(groups)) for g in groups.values()]
    out = {kind: [[[sum(w * g["err"][(kind, i, u, k)] for w, g in zip(weights, groups.values()))
                    for k in keeps_sorted] for u in range(units)] for i in range(L)]
           for kind in ("k_err", "v_err")}
    return {**{k: first[k] for k in ("head_dim", "heads", "per", "window")}, "keeps": keeps_sorted,
            "k_err": out["k_err"], "v_err": out["v_err"], "tokens": total,
            "seconds": sum(float(p.get("seconds", 0.0)) for p in parts), "samples": sorted(groups),
            "error": "mean KL(dense || pruned) per predicted token, nats"}
