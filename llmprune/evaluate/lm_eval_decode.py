"""lm-eval's HF model with decode-faithful loglikelihood scoring for activation sparsity.

lm-eval scores a loglikelihood request in one forward over ``context + continuation[:-1]``; with activation
sparsity at decode only (the default), that forward is a prefill and runs dense. :func:`decode_scoring_lm` returns
an ``HFLM`` whose ``_loglikelihood_tokens`` scores each request as the runtime decodes it instead
(:func:`llmprune.runtime.actsparse.scoring.score_continuations`: dense prefill of the context, sparse
teacher-forced decode steps for the continuation, optionally dense KV rewrites every ``K`` tokens). Requests
with the same context share one prefill; the batch size does not apply (one context at a time).
"""

from __future__ import annotations

from llmprune.errors import ConfigError
from llmprune.runtime.actsparse.apply import act_sparsity
from llmprune.runtime.actsparse.scoring import ScoringStats, score_continuations


def decode_scoring_lm(model, tokenizer, period: int | None = None, **kwargs):
    """An ``lm_eval`` ``HFLM`` on ``model`` that scores loglikelihood requests decode-faithfully.

    Args:
        model: a loaded causal LM with activation sparsity attached.
        tokenizer: its tokenizer.
        period: ``--act-correction K`` (dense KV rewrite every ``K`` continuation tokens) or None.
        kwargs: passed to ``HFLM`` (``batch_size`` ...).

    Returns:
        the ``HFLM``; its ``act_scoring`` attribute holds the mode, period and :class:`ScoringStats`.

    Raises:
        ConfigError: when ``model`` has no activation sparsity.
    """
    from lm_eval.models.huggingface import HFLM

    if act_sparsity(model) is None:
        raise ConfigError("--act-scoring decode / --act-correction need activation sparsity "
                          "(--act-sparsity / --act-thresholds)")

    class DecodeScoringLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            groups: dict[tuple[int, ...], list[int]] = {}
            prepared = []
            for i, (_, ctx, cont) in enumerate(requests):
                ctx, cont = list(ctx), list(cont)
                extra = len(ctx) + len(cont) - 1 - self.max_length  # lm-eval keeps the last max_length inputs
                if extra > 0:
                    ctx = ctx[extra:]
                if not ctx:
                    raise ConfigError(f"a continuation of {len(cont)} tokens does not fit max_length "
                                      f"{self.max_length}")
                prepared.append((ctx, cont))
                groups.setdefault(tuple(ctx), []).append(i)
            res: list[tuple[float, bool] | None] = [None] * len(requests)
            for ctx, idx in groups.items():
                scored = score_continuations(self.model, list(ctx), [prepared[i][1] for i in idx], period,
                                             self.act_scoring["stats"])
                for i, (lp, greedy) in zip(idx, scored):
                    answer = (float(lp.sum()), greedy)
                    res[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return res

    lm = DecodeScoringLM(pretrained=model, tokenizer=tokenizer, **kwargs)
    lm.act_scoring = {"mode": "decode", "correction": period, "stats": ScoringStats()}
    return lm
