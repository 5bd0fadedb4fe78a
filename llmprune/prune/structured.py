"""Physical surgery for structured pruning: remove FFN channels and attention head groups in place.

Structured pruning removes whole FFN channels (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``) and
whole attention *head groups* (one KV head with the query heads that share it: rows of
``q_proj``/``k_proj``/``v_proj``, columns of ``o_proj``), leaving a dense, smaller model. Supported: decoder
layers with a gated MLP (``mlp.gate_proj/up_proj/down_proj``) and ``self_attn.q/k/v/o_proj`` -- Llama,
Mistral, Qwen2, Qwen3 and look-alikes. How such models are described and reloaded: :mod:`llmprune.model.structured`.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.model.access import attn_of, kv_heads, mlp_of


def slice_linear(
    linear: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` keeping output rows ``out_idx`` and input columns ``in_idx`` (None = all)."""
    w = linear.weight.data
    b = linear.bias.data if linear.bias is not None else None
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        b = b.index_select(0, out_idx.to(w.device)) if b is not None else None
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def group_params(layer: nn.Module) -> int:
    """Parameters of one KV head group: its query heads' q rows and o columns, its k and v rows."""
    attn = attn_of(layer)
    g = kv_heads(layer)
    return (attn.q_proj.out_features // g + attn.k_proj.out_features // g) * attn.q_proj.in_features * 2


def prune_mlp_channels(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep FFN channels ``keep`` (sorted LongTensor): gate/up rows and down columns."""
    mlp = mlp_of(layer)
    mlp.gate_proj = slice_linear(mlp.gate_proj, out_idx=keep)
    mlp.up_proj = slice_linear(mlp.up_proj, out_idx=keep)
    mlp.down_proj = slice_linear(mlp.down_proj, in_idx=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def group_rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """Row indices of whole head groups: group ``g`` covers rows ``[g*per_group, (g+1)*per_group)``."""
    return (groups.long().unsqueeze(1) * per_group + torch.arange(per_group).unsqueeze(0)).reshape(-1)


def prune_head_groups(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep KV head groups ``keep`` (sorted LongTensor): the KV head and its query heads.

    q rows, k/v rows and o columns of every dropped group are removed; the number of
    query heads per KV head (``num_key_value_groups``) is unchanged, so GQA still works.
    """
    attn = attn_of(layer)
    hd = attn.head_dim
    n_rep = attn.q_proj.out_features // attn.k_proj.out_features
    q_idx = group_rows(keep, n_rep * hd)
    kv_idx = group_rows(keep, hd)
    attn.q_proj = slice_linear(attn.q_proj, out_idx=q_idx)
    attn.k_proj = slice_linear(attn.k_proj, out_idx=kv_idx)
    attn.v_proj = slice_linear(attn.v_proj, out_idx=kv_idx)
    attn.o_proj = slice_linear(attn.o_proj, in_idx=q_idx)
    for name, value in (("num_heads", keep.numel() * n_rep), ("num_key_value_heads", keep.numel())):
        if hasattr(attn, name):
            setattr(attn, name, int(value))
