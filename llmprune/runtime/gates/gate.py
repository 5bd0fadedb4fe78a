"""Learned block-sparse attention gates (SeerAttention-style), trained post-training.

One :class:`AttnGate` per attention layer predicts, for a block of queries, a distribution over KV blocks of
``block_size`` tokens; inference keeps only the top blocks per KV head. Design (our choices):

* **Inputs**: Q and K *before* RoPE. The attention function receives them after RoPE, so they are
  un-rotated with the layer's own ``cos``/``sin`` (stashed by a forward pre-hook). Pooled pre-RoPE vectors
  summarise content; position comes from the block-level terms below.
* **Pooling**: Q average-pooled per block; K pooled per block with max, min and average, concatenated (3d).
  Selection is per **KV head** (shared by its GQA group, so the decode kernel loads each block once for the
  whole group): the group's pooled queries are concatenated (``G * d``) and the ground truth is max-pooled
  over the group's heads too.
* **Projections**: per KV head, ``Wq: G*d -> gate_dim`` and ``Wk: 3d -> gate_dim`` on RMS-normalised features.
* **Block position**: RoPE applied to the projected gate q/k at *block* granularity (block index as position),
  plus a learned per-head bias over log-bucketed block distance (recency / long-range preference).
* **Scores** ``gq . gk / sqrt(gate_dim) + bias``, causal over blocks, softmax over KV blocks.

Ground truth: the frozen model's causal attention probabilities, max-pooled to ``[query block, key block]``
(and over the GQA group), renormalised over key blocks; computed in chunks of query blocks so the full
``S x S`` map is never materialised. Loss: ``KL(gt || gate)``. Training lives in :mod:`llmprune.runtime.gates.training`;
inference (the ``llmprune_gated`` attention implementation) in :mod:`llmprune.runtime.gates.runtime`; the gates'
files (``attn_gates.safetensors`` + ``attn_gates.json``) are written and read by :mod:`llmprune.runtime.gates.files`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import LlmpruneError


@dataclass
class GateConfig:
    """Shape of one model's gates (one gate per attention layer)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 64
    gate_dim: int = 64
    rope_base: float = 10000.0
    distance_buckets: int = 24

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise LlmpruneError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise LlmpruneError(f"block_size must be a power of two >= 16, got {self.block_size}")

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def for_model(cls, model, **kw) -> GateConfig:
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        return cls(c.num_hidden_layers, heads, kv, head_dim, **kw)


# ----------------------------------------------------------------------------------------------- pooling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """Undo RoPE: ``x [b, h, s, d]`` rotated with ``cos/sin [b, s, d]`` -> pre-RoPE (up to the rope scale²)."""
    if cos is None:
        return x
    if cos.shape[-1] != x.shape[-1]:
        raise LlmpruneError("attention gates need full-width RoPE (partial rotary models are not supported)")
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos - rotate_half(x) * sin


def pool_blocks(x: torch.Tensor, block_size: int, ops: tuple[str, ...] = ("avg",)) -> torch.Tensor:
    """``x [..., S, d]`` -> ``[..., ceil(S/B), len(ops)*d]``; the last block may be partial (pooled over its tokens)."""
    s = x.shape[-2]
    nb = -(-s // block_size)
    xs = F.pad(x, (0, 0, 0, nb * block_size - s)).unflatten(-2, (nb, block_size))
    valid = (torch.arange(nb * block_size, device=x.device) < s).view(nb, block_size, 1)
    out = []
    for op in ops:
        if op == "avg":
            out.append(xs.sum(-2) / valid.sum(-2).to(x.dtype))
        elif op == "max":
            out.append(xs.masked_fill(~valid, float("-inf")).amax(-2))
        elif op == "min":
            out.append(xs.masked_fill(~valid, float("inf")).amin(-2))
        else:
            raise ValueError(op)
    return torch.cat(out, dim=-1)


def pool_q(q_pre: torch.Tensor, block_size: int, num_kv_heads: int) -> torch.Tensor:
    """Pre-RoPE ``q [b, Hq, S, d]`` -> ``[b, Hkv, nb, G*d]`` (average per block, group heads concatenated)."""
    b, hq, _, d = q_pre.shape
    p = pool_blocks(q_pre.float(), block_size)  # [b, Hq, nb, d]
    return p.view(b, num_kv_heads, hq // num_kv_heads, -1, d).permute(0, 1, 3, 2, 4).flatten(-2)


def pool_k(k_pre: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pre-RoPE ``k [b, Hkv, S, d]`` -> ``[b, Hkv, nb, 3d]`` (max, min, average per block)."""
    return pool_blocks(k_pre.float(), block_size, ("max", "min", "avg"))


@torch.no_grad()
def block_ground_truth(
    q: torch.Tensor, k: torch.Tensor, scaling: float, block_size: int, chunk_blocks: int | None = None
) -> torch.Tensor:
    """Target block distribution from causal attention (post-RoPE ``q [b,Hq,S,d]``, ``k [b,Hkv,S,d]``).

    Returns ``[b, Hkv, nb, nb]``: attention probabilities max-pooled over each (query block, key block) tile
    and over the GQA group's heads, renormalised over key blocks. Query blocks are processed
    ``chunk_blocks`` at a time (default: about 64M scores per chunk).
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nb = -(-s // block_size)
    if chunk_blocks is None:
        chunk_blocks = max(1, (1 << 26) // max(1, b * hq * block_size * s))
    kf = k.float().repeat_interleave(g, dim=1)
    pad_k = nb * block_size - s
    out = torch.empty(b, hkv, nb, nb, device=q.device)
    cols = torch.arange(s, device=q.device)
    for c0 in range(0, nb, chunk_blocks):
        r0, r1 = c0 * block_size, min((c0 + chunk_blocks) * block_size, s)
        scores = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scaling
        rows = torch.arange(r0, r1, device=q.device)
        scores.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        p = scores.softmax(-1)
        nq = -(-(r1 - r0) // block_size)
        p = F.pad(p, (0, pad_k, 0, nq * block_size - (r1 - r0)))
        p = p.view(b, hkv, g, nq, block_size, nb, block_size).amax(dim=(2, 4, 6))
        out[:, :, c0 : c0 + nq] = p
    return out / out.sum(-1, keepdim=True)


def kl_loss(gt: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(gt || exp(logp))`` (entries with ``gt == 0`` contribute nothing)."""
    pos = gt > 0
    terms = torch.where(pos, gt * (torch.log(gt.clamp_min(1e-30)) - logp.masked_fill(~pos, 0.0)), 0.0)
    return terms.sum(-1).mean()


# ------------------------------------------------------------------------------------------------ gate


def _bucket(dist: torch.Tensor, n: int) -> torch.Tensor:
    return torch.floor(2 * torch.log2(dist.clamp_min(0).float() + 1)).long().clamp_max(n - 1)


class AttnGate(nn.Module):
    """Gate of one attention layer: pooled features -> log-probabilities over KV blocks."""

    def __init__(self, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        h, g, d, dg = cfg.num_kv_heads, cfg.group, cfg.head_dim, cfg.gate_dim
        self.q_proj = nn.Parameter(torch.randn(h, g * d, dg) / math.sqrt(g * d))
        self.k_proj = nn.Parameter(torch.randn(h, 3 * d, dg) / math.sqrt(3 * d))
        self.dist_bias = nn.Parameter(torch.zeros(h, cfg.distance_buckets))
        inv = 1.0 / (cfg.rope_base ** (torch.arange(0, dg, 2, dtype=torch.float32) / dg))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _project(self, feats: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        feats = feats.float()
        feats = feats * torch.rsqrt(feats.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = torch.einsum("bhnf,hfg->bhng", feats, weight)
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        return x * cos + rotate_half(x) * sin

    def project_q(self, qf: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``qf [b, Hkv, n, G*d]`` at block indices ``pos [n]`` -> ``[b, Hkv, n, gate_dim]``."""
        return self._project(qf, self.q_proj, pos)

    def project_k(self, kf: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``kf [b, Hkv, n, 3d]`` at block indices ``pos [n]`` -> ``[b, Hkv, n, gate_dim]``."""
        return self._project(kf, self.k_proj, pos)

    def scores(self, gq: torch.Tensor, gk: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[b, Hkv, nq, nk]`` over key blocks; future blocks get ``-inf``."""
        s = torch.matmul(gq, gk.transpose(-1, -2)) / math.sqrt(self.cfg.gate_dim)
        dist = qpos[:, None] - kpos[None, :]
        s = s + self.dist_bias[:, _bucket(dist, self.cfg.distance_buckets)].unsqueeze(0)
        return s.masked_fill(dist < 0, float("-inf")).log_softmax(-1)

    def forward(self, qf: torch.Tensor, kf: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        qpos = torch.arange(q_offset, q_offset + qf.shape[2], device=qf.device)
        kpos = torch.arange(kf.shape[2], device=kf.device)
        return self.scores(self.project_q(qf, qpos), self.project_k(kf, kpos), qpos, kpos)


# --------------------------------------------------------------------------------------------- selection


def select_blocks(
    logp: torch.Tensor,
    qpos: torch.Tensor,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    budget: int | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """Boolean keep-mask ``[..., nq, nk]`` from gate log-probabilities.

    Exactly one of ``sparsity`` (fraction of each query block's causal KV blocks skipped: keep
    ``ceil((1 - s) * n)``), ``threshold`` (keep blocks with gate probability >= t) or ``budget`` (tokens:
    keep ``ceil(budget / block_size)`` blocks) is used. The first block and the query's own (most recent)
    block are always kept, on top of the threshold and inside the sparsity/budget count (at least 2).
    """
    nk = logp.shape[-1]
    kpos = torch.arange(nk, device=logp.device)
    valid = kpos[None, :] <= qpos[:, None]
    forced = valid & ((kpos[None, :] == 0) | (kpos[None, :] == qpos[:, None]))
    if threshold is not None:
        return valid & ((logp.exp() >= threshold) | forced)
    n_valid = valid.sum(-1)
    if budget is not None:
        keep_n = torch.full_like(n_valid, -(-budget // block_size))
    else:
        keep_n = torch.ceil((1.0 - float(sparsity or 0.0)) * n_valid.double() - 1e-9).long()
    keep_n = torch.maximum(keep_n, n_valid.clamp_max(2)).clamp_max(n_valid)
    ranked = logp.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, kpos.expand_as(order).contiguous())
    return valid & (rank < keep_n[:, None])
