"""How spread each layer's attention is over KV blocks: normalized block-attention entropy from calibration text.

For every query row ``i`` of every head, the attention probabilities are summed over blocks of ``block_size``
tokens (the gates' unit of selection), ``p_b``, and scored by ``H_i = -sum_b p_b log p_b / log n_i`` with ``n_i`` the
row's causal block count, so ``H_i = 1`` for attention spread evenly over its blocks and 0 for attention on one
block. A layer's score is the mean over heads and over the rows with at least ``min_blocks`` causal blocks.
Low-entropy layers tolerate more block sparsity (:mod:`llmprune.runtime.gates.budgets`).

Runs the model's own eager attention (``output_attentions``) one sequence at a time, then restores the model's
attention implementation; memory is ``layers x heads x seqlen^2`` floats for one sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.errors import LlmpruneError


def block_entropy(probs: torch.Tensor, block_size: int, min_blocks: int) -> tuple[float, int]:
    """``(sum of normalized block entropies, rows counted)`` of causal attention ``probs [heads, s, s]``."""
    h, s, _ = probs.shape
    nb = -(-s // block_size)
    pad = nb * block_size - s
    p = torch.nn.functional.pad(probs.double(), (0, pad)).reshape(h, s, nb, block_size).sum(-1)  # [h, s, nb]
    n_rows = torch.arange(s, device=probs.device) // block_size + 1  # causal blocks of each row
    rows = n_rows >= min_blocks
    if not bool(rows.any()):
        return 0.0, 0
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [h, s]
    norm = ent[:, rows] / n_rows[rows].double().log()
    return float(norm.sum()), int(norm.numel())


@torch.no_grad()
def attention_entropy(model: nn.Module, ids: torch.Tensor, block_size: int = 64, min_blocks: int = 4) -> list[float]:
    """Mean normalized block-attention entropy per decoder layer (module docstring).

    Args:
        model: a causal LM without gates attached.
        ids: ``[n, seqlen]`` calibration token ids (``seqlen >= min_blocks * block_size`` to count any row).
        block_size: tokens per KV block (the gates' block size).
        min_blocks: rows with fewer causal blocks are not counted.
    """
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    try:
        sums: list[float] = []
        count = 0
        for row in ids:
            out = model(row[None].to(device), output_attentions=True, use_cache=False)
            per_layer = [block_entropy(a[0], block_size, min_blocks) for a in out.attentions]
            sums = [x for x, _ in per_layer] if not sums else [a + x for a, (x, _) in zip(sums, per_layer)]
            count += per_layer[0][1]
            del out
    finally:
        model.set_attn_implementation(impl)
    if not count:
        raise LlmpruneError(f"no query row has {min_blocks} causal blocks of {block_size} tokens: use longer sequences")
    return [x / count for x in sums]
