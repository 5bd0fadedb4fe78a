"""Generate and score the long-context tasks with the runtime features active in decode.

Decoding is greedy (pure argmax: the model's ``generation_config`` processors are not applied), batch 1, up to the
task's ``max_new_tokens`` or an end-of-sequence token. A :class:`Variant` is one cache setting of an already
loaded model: ``cache=None`` is transformers' dense ``DynamicCache``; otherwise the runtime's cache factory
(:attr:`llmprune.runtime.options.RuntimeSetup.past_key_values`, e.g. the bitmap KV cache). Attention gates
(:func:`llmprune.runtime.gates.runtime.attach_gates`) act in every forward of the model they are attached to, so
a gated model is its own variant.

**Shared prefill.** Several variants of one model share the prompt's forward pass: the bitmap cache's prefill is
dense by definition (the prompt attends to itself unpruned, and its K/V are compressed at the next step), so the
prompt's logits and K/V are the same for every cache. :func:`generate` runs the prompt once with a dense cache,
takes the first token from its logits, hands each variant's fresh cache the prompt's K/V (``cache.update`` per
layer, as the prefill itself would) and continues with ``model.generate``. This is exactly what
``model.generate(prompt, past_key_values=factory(1))`` computes (checked in ``tests/evaluate/test_longctx.py``),
for a fraction of the prefill cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmprune.evaluate.longctx.prompt import encode
from llmprune.evaluate.longctx.scoring import string_match_all
from llmprune.evaluate.longctx.tasks import LongSample
from llmprune.model.access import cache_argument, output_cache

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One runtime setting to score.

    Attributes:
        label: short name for tables, e.g. ``"dense"``, ``"kv_sparsity=0.7"``.
        runtime: the options recorded with its results (``RuntimeConfig.to_dict()``; empty = dense).
        cache: ``factory(batch_size) -> Cache`` or None (dense ``DynamicCache``).
        features: feature labels for output (``RuntimeSetup.features``).
    """

    label: str
    runtime: dict[str, Any] = field(default_factory=dict)
    cache: Callable[[int], Any] | None = None
    features: list[str] = field(default_factory=list)


@dataclass
class SampleResult:
    """One generated answer, scored."""

    task: str
    context: int
    index: int
    depth: float | None
    n_tokens: int
    prediction: str
    score: float
    new_tokens: int
    kv_bytes: int
    kv_dense_bytes: int


def _dense_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_bytes(cache) -> tuple[int, int]:
    """``(stored bytes, dense bytes)`` of a cache: the bitmap cache's own report, else the dense tensors' sizes."""
    if hasattr(cache, "memory_report"):
        rep = cache.memory_report()
        return int(rep["stored_bytes"]), int(rep["dense_bytes"])
    n = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n, n


def _greedy_config(model, max_new_tokens: int, eos: list[int]):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=eos[0] if eos else None)


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config and the tokenizer's (a chat model's turn end)."""
    ids: list[int] = []
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _stopping(stop: Callable[[list[int]], bool] | None, start: int):
    """``model.generate`` stopping criteria calling ``stop(new tokens)`` after each step (None: no criteria)."""
    if stop is None:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [stop(row[start:].tolist()) for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, caches: Sequence[Callable[[int], Any] | None],
             eos: list[int], stop: Callable[[list[int]], bool] | None = None) -> list[tuple[list[int], Any]]:
    """Greedy continuations of one prompt (``[1, T]``), one per cache factory, sharing the prompt's prefill.

    Args:
        stop: ``stop(new token ids) -> True`` ends a continuation early (besides ``eos`` and the budget).

    Returns:
        ``[(new token ids, the cache after generation), ...]`` in the order of ``caches``.
    """
    key = cache_argument(model)
    out = model(input_ids=input_ids, use_cache=True, **{key: _dense_cache(model)})
    prefill = output_cache(out)
    first = int(out.logits[0, -1].float().argmax())
    results = []
    for factory in caches:
        cache = factory(1) if factory is not None else _dense_cache(model)
        for i, layer in enumerate(prefill.layers):
            cache.update(layer.keys, layer.values, i)
        tokens = [first]
        if first not in eos and max_new_tokens > 1 and not (stop is not None and stop(tokens)):
            ids = torch.cat([input_ids, input_ids.new_tensor([[first]])], dim=1)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=_greedy_config(model, max_new_tokens - 1, eos),
                                 stopping_criteria=_stopping(stop, input_ids.shape[1]), **{key: cache})
            tokens += gen[0, ids.shape[1]:].tolist()
        results.append((tokens, cache))
    return results


def _decode(tokenizer, tokens: list[int], eos: list[int]) -> str:
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def run_samples(model, tokenizer, samples: Sequence[LongSample], variants: Sequence[Variant],
                progress: Callable[[str], None] | None = None, stop_when_found: bool = True,
                ) -> dict[str, list[SampleResult]]:
    """Generate and score every sample under every variant of ``model``.

    Args:
        stop_when_found: end a continuation once every reference is in it. ``string_match_all`` only grows as
            the answer grows, so the score is the one the full budget would give, for fewer decode steps (the
            stored prediction is then the answer up to that point).

    Returns:
        ``{variant label: [SampleResult, ...]}`` in the order of ``samples``.
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    out: dict[str, list[SampleResult]] = {v.label: [] for v in variants}
    t0 = time.perf_counter()
    for n, s in enumerate(samples, 1):
        ids = torch.tensor([encode(tokenizer, s.prompt)], device=device)
        def found(tokens: list[int], refs=s.outputs) -> bool:
            return string_match_all(_decode(tokenizer, tokens, eos), refs) == 1.0

        gens = generate(model, ids, s.max_new_tokens, [v.cache for v in variants], eos,
                        stop=found if stop_when_found else None)
        for v, (tokens, cache) in zip(variants, gens):
            text = _decode(tokenizer, tokens, eos)
            stored, dense = cache_bytes(cache)
            out[v.label].append(SampleResult(s.task, s.context, s.index, s.depth, s.n_tokens, text,
                                             string_match_all(text, s.outputs), len(tokens), stored, dense))
        if progress is not None:
            scores = " ".join(f"{v.label}={out[v.label][-1].score:.2f}" for v in variants)
            progress(f"[{n}/{len(samples)} {time.perf_counter() - t0:.0f}s] {s.task}@{s.context} #{s.index}: {scores}")
    return out
