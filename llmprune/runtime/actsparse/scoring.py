"""Decode-faithful scoring of continuations under activation sparsity (lm-eval loglikelihood requests).

A loglikelihood request ``(context, continuation)`` is normally scored in one forward pass over
``context + continuation[:-1]``. That forward is a *prefill* (``s > 1``), and activation sparsity by default only
acts on decode steps (:meth:`~llmprune.runtime.actsparse.apply.ActSparsity.active`), so the score would be the
dense model's. Here a request is scored the way the runtime would produce the continuation:

1. the context is prefilled into a KV cache, dense unless ``act_prefill`` (as the runtime does); its last logits
   score the first continuation token (at run time the first new token also comes from the prefill);
2. the remaining continuation tokens are *decode steps*, teacher-forced: continuation tokens ``c_0 .. c_{n-2}``
   are fed on the cache, every linear input sparsified, and score ``c_1 .. c_{n-1}``. They run as one forward of
   ``n - 1`` tokens with sparsity forced on. That is exactly ``n - 1`` single-token decode steps: the
   thresholding is per token and entry, and causal attention over the cache sees the same keys and values in
   both orders (up to floating-point summation order);
3. with ``period = K`` (``--act-correction K``, Sirius-style as in
   :func:`~llmprune.runtime.actsparse.correction.generate_with_correction`), after every ``K`` sparse decode
   steps the cache is cropped back and the dense model (the same weights, sparsity disabled) runs those ``K``
   tokens in one forward, which rewrites their KV entries with the dense model's; the next ``K`` tokens decode
   sparsely on the corrected cache. The scores stay the sparse model's: the tokens are given (teacher forcing),
   so there is no drafted token to accept or replace, and what correction can change is only the KV history the
   sparse steps attend to. (Scoring with the dense verifier's logits would simply be the dense model.) The
   rewrite after the last chunk of a continuation changes no score and is skipped.

Requests that share a context (the choices of a multiple-choice question) share one prefill; the cache is cropped
back to the context after each continuation. Batch size 1, the model's default (dense) KV cache.
A one-token continuation (most of lambada_openai) is scored entirely by the prefill, so with a dense prefill its
score is the dense model's: at run time that token would come from the dense prefill too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import ConfigError
from llmprune.model.access import cache_argument, output_cache
from llmprune.runtime.actsparse.apply import act_sparsity
from llmprune.runtime.actsparse.correction import crop_cache


@dataclass
class ScoringStats:
    """Counts over the scored requests.

    Attributes:
        contexts: prefills run.
        requests: continuations scored.
        prefill_tokens: continuation tokens scored by the prefill's last logits.
        decode_tokens: continuation tokens scored by (sparse) decode steps.
        rewrites: dense KV rewrites (correction forwards).
    """

    contexts: int = 0
    requests: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    rewrites: int = 0

    def to_dict(self) -> dict[str, int | float]:
        total = self.prefill_tokens + self.decode_tokens
        return {"contexts": self.contexts, "requests": self.requests, "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens, "rewrites": self.rewrites,
                "decode_fraction": self.decode_tokens / total if total else 0.0}


def _forward(model: nn.Module, ids: list[int], cache, key: str, device: torch.device):
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=True, **({key: cache} if cache is not None else {}))
    return F.log_softmax(out.logits[0].float(), dim=-1), output_cache(out)  # [len(ids), vocab]


@torch.no_grad()
def score_continuations(model: nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]],
                        period: int | None = None, stats: ScoringStats | None = None
                        ) -> list[tuple[torch.Tensor, bool]]:
    """Log-probabilities of each continuation after ``context``, decoded as the runtime would (module doc).

    Args:
        model: a causal LM with activation sparsity attached (:func:`attach_act_sparsity`); its
            ``prefill`` flag decides whether the context prefill is sparse.
        context: ``[C]`` token ids, ``C >= 1``.
        continuations: token id lists, each of length ``>= 1``.
        period: ``K`` for dense KV rewrites every ``K`` decode steps, or None (no correction).
        stats: counts to add to.

    Returns:
        per continuation: ``(logprobs [n] fp32, greedy)`` where ``greedy`` says every token was the argmax.

    Raises:
        ConfigError: without activation sparsity, with an empty context or continuation, or a bad ``period``.
    """
    rt = act_sparsity(model)
    if rt is None:
        raise ConfigError("decode-faithful scoring needs activation sparsity (--act-sparsity / --act-thresholds)")
    if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
        raise ConfigError(f"--act-correction must be an integer >= 1, got {period!r}")
    if len(context) < 1 or any(len(c) < 1 for c in continuations):
        raise ConfigError("decode-faithful scoring: the context and every continuation need at least one token")
    stats = stats if stats is not None else ScoringStats()
    key = cache_argument(model)
    device = next(model.parameters()).device
    enabled, prefill = rt.enabled, rt.prefill
    out: list[tuple[torch.Tensor, bool]] = []
    try:
        rt.enabled = True  # the prefill: dense unless act_prefill (rt.prefill as configured)
        lp_ctx, cache = _forward(model, list(context), None, key, device)
        if not hasattr(cache, "crop"):
            raise ConfigError("decode-faithful scoring needs the dense KV cache (it crops and rewrites it)")
        stats.contexts += 1
        length = len(context)
        for cont in continuations:
            cont = [int(t) for t in cont]
            rows = [lp_ctx[-1]]  # scores c_0
            fed = cont[:-1]  # decode steps c_0 .. c_{n-2}, scoring c_1 .. c_{n-1}
            step = period or max(1, len(fed))
            for i in range(0, len(fed), step):
                chunk = fed[i:i + step]
                rt.enabled, rt.prefill = True, True  # sparse decode steps (several at once: see the module doc)
                lp, cache = _forward(model, chunk, cache, key, device)
                rows.extend(lp.unbind(0))
                if period is not None and i + step < len(fed):
                    crop_cache(cache, length + i)
                    rt.enabled = False  # the dense model rewrites the chunk's KV entries
                    _, cache = _forward(model, chunk, cache, key, device)
                    stats.rewrites += 1
            crop_cache(cache, length)
            logits = torch.stack(rows)  # [n, vocab]
            target = torch.tensor(cont, device=logits.device)
            out.append((logits.gather(1, target[:, None])[:, 0], bool((logits.argmax(-1) == target).all())))
            stats.requests += 1
            stats.prefill_tokens += 1
            stats.decode_tokens += len(fed)
    finally:
        rt.enabled, rt.prefill = enabled, prefill
    return out
