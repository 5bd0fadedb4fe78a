"""Sirius-style correction of activation-sparse decoding: the dense model verifies every ``K`` sparse tokens.

Sirius ("Contextual Sparsity with Correction for Efficient LLMs", Zhou et al. 2024) observes that contextual
sparsity hurts generation and reasoning much more than perplexity suggests, and recovers most of it by letting
the full model periodically check the sparse model's output. Here, as in speculative decoding with greedy
acceptance, one round is:

1. the sparse model (:class:`~llmprune.runtime.actsparse.apply.ActSparsity` enabled) decodes ``K`` tokens one at
   a time from position ``L`` (the KV cache holds ``[0, L)``; token ``x_L`` is pending);
2. the cache is cropped back to ``L`` and the *dense* model (sparsity disabled: the same weights) runs the ``K``
   tokens ``x_L .. x_{L+K-1}`` in one parallel forward, which rewrites their KV entries with the dense model's and
   gives the dense greedy choice ``p_{i+1}`` after every position;
3. the drafted tokens ``x_{L+1} .. x_{L+K}`` are accepted while they equal the dense choice; at the first
   disagreement (``j`` accepted) the dense choice replaces the drafted token, the cache is cropped to
   ``L + j + 1`` (dense entries of accepted tokens only) and the next round starts from there.

Every kept token is then the dense model's greedy choice given the kept prefix, so the output is the dense greedy
output (up to floating-point differences between one parallel forward and token-by-token decode), while the
tokens are produced by the sparse model; the mean accepted length says how many of every ``K`` drafted tokens
survive, i.e. how much the dense model's verification costs per token. Sirius also proposes a relaxed acceptance
(likelihood above a threshold) and tree drafting; neither is implemented. Batch size 1, greedy, with the
model's default (dense) KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.errors import ConfigError
from llmprune.model.access import cache_argument, output_cache
from llmprune.runtime.actsparse.apply import act_sparsity


@dataclass
class CorrectionResult:
    """Tokens produced with correction and how the verification went.

    Attributes:
        tokens: ``[new]`` generated token ids (the prompt excluded).
        accepted: drafted tokens accepted per round (``0 .. K``).
        period: ``K``.
    """

    tokens: torch.Tensor
    accepted: list[int] = field(default_factory=list)
    period: int = 1

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def mean_accepted(self) -> float:
        """Mean drafted tokens accepted per verification (out of ``K``)."""
        return sum(self.accepted) / max(1, len(self.accepted))

    def summary(self) -> str:
        return (f"act correction every {self.period} tokens: {self.rounds} dense verifications, mean accepted length "
                f"{self.mean_accepted:.2f} of {self.period}")


def _forward(model: nn.Module, ids: torch.Tensor, cache, key: str):
    out = model(input_ids=ids, use_cache=True, **({key: cache} if cache is not None else {}))
    return out.logits, output_cache(out)  # [1, len(ids), vocab]


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions (``crop(-n)`` removes ``n`` in every transformers version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def generate_with_correction(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, period: int,
                             eos_token_id: int | None = None) -> CorrectionResult:
    """Greedy decoding of ``max_new_tokens`` with the sparse model, verified by the dense one every ``period``.

    Args:
        model: a causal LM with activation sparsity attached (:func:`attach_act_sparsity`).
        input_ids: ``[1, prompt]`` token ids.
        max_new_tokens: tokens to produce (fewer when ``eos_token_id`` is produced).
        period: ``K``, sparse tokens between two dense verifications (>= 1).
        eos_token_id: stop after this token.

    Raises:
        ConfigError: without activation sparsity, with a batch of several sequences, or a bad ``period``.
    """
    rt = act_sparsity(model)
    if rt is None:
        raise ConfigError("--act-correction needs activation sparsity (--act-sparsity / --act-thresholds)")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ConfigError(f"--act-correction must be an integer >= 1, got {period!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError("--act-correction decodes one sequence at a time (batch size 1)")
    key = cache_argument(model)
    enabled = rt.enabled
    try:
        rt.enabled = True
        logits, cache = _forward(model, input_ids, None, key)  # prefill (dense unless act_prefill)
        if not hasattr(cache, "crop"):
            raise ConfigError("--act-correction needs the dense KV cache (it crops and rewrites it)")
        pending = logits[:, -1].argmax(-1)  # [1]: x_L, not in the cache yet
        out: list[int] = []
        accepted: list[int] = []
        while len(out) < max_new_tokens:
            length = cache.get_seq_length()
            fed = [pending]  # x_L .. x_{L+K-1}
            drafts = []  # x_{L+1} .. x_{L+K}
            rt.enabled = True
            for _ in range(period):
                logits, cache = _forward(model, fed[-1][:, None], cache, key)
                drafts.append(logits[:, -1].argmax(-1))
                if len(drafts) < period:
                    fed.append(drafts[-1])
            crop_cache(cache, length)
            rt.enabled = False  # the dense verifier: same weights, every input kept
            logits, cache = _forward(model, torch.stack(fed, 1), cache, key)
            dense = logits[0].argmax(-1)  # [K]: dense choice after each fed token
            j = 0
            while j < period and int(drafts[j]) == int(dense[j]):
                j += 1
            accepted.append(j)
            kept = [int(t) for t in fed[: j + 1]] if j < period else [int(t) for t in fed]
            out.extend(kept)
            if j < period:
                crop_cache(cache, length + j + 1)
                pending = dense[j : j + 1]  # the dense choice replaces the first disagreeing draft
            else:
                pending = drafts[-1]
            if eos_token_id is not None and eos_token_id in kept:
                out = out[: out.index(eos_token_id) + 1]
                break
        if eos_token_id is None or eos_token_id not in out:
            out.append(int(pending))  # the last verified token
        return CorrectionResult(torch.tensor(out[:max_new_tokens], dtype=torch.long), accepted, period)
    finally:
        rt.enabled = enabled
