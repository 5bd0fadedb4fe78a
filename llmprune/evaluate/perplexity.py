"""WikiText-2 perplexity, paper protocol (SparseGPT/Wanda).

The raw test split is joined with ``"\\n\\n"``, tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens (the remainder is dropped), and
perplexity is ``exp`` of the mean next-token NLL over every predicted token
of every window (``seqlen - 1`` per window).

Offline, pass the raw text file (``--data-path``; one line per non-empty line
of the split, as in ``../shared/data/wikitext2/wiki.test.raw.txt``); otherwise
``wikitext-2-raw-v1`` is read with ``datasets``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmprune.config import DEFAULT_KV_WINDOW
from llmprune.errors import LlmpruneError
from llmprune.model.access import cache_argument
from llmprune.runtime.kvcache import BitmapKVCache
from llmprune.runtime.kvcache.budgets import load_budgets

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity over ``windows`` windows of ``seqlen`` tokens (``tokens`` predicted tokens in all)."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CachePerplexityResult(PerplexityResult):
    """:class:`PerplexityResult` of :func:`perplexity_with_cache`, plus the cache settings and its size."""

    k_sparsity: float
    v_sparsity: float
    kv_window: int
    bytes_ratio: float  # stored/dense at the end of a window, at the evaluated dtype
    bytes_ratio_16bit: float  # same, counting 2-byte values


def wikitext2_text(data_path: str | os.PathLike | None = None) -> str:
    """WikiText-2 raw test text joined with ``"\\n\\n"``."""
    if data_path is not None:
        path = Path(data_path).expanduser()
        if path.is_dir():
            path = path / "wiki.test.raw.txt"
        if not path.is_file():
            raise LlmpruneError(f"WikiText-2 file not found: {path}")
        lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
        if not lines:
            raise LlmpruneError(f"WikiText-2 file {path} is empty")
        return "\n\n".join(lines)
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:
        raise LlmpruneError(
            f"cannot load wikitext-2-raw-v1 ({type(exc).__name__}); offline, pass --data-path to wiki.test.raw.txt"
        ) from None
    return "\n\n".join(ds["text"])


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """``[1, N]`` token ids of ``text`` (the tokenizer's own special-token policy)."""
    return tokenizer(text, return_tensors="pt").input_ids


def eval_windows(input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n_windows, seqlen]`` windows of a ``[1, N]`` token stream (remainder dropped).

    Raises:
        LlmpruneError: when the stream holds less than one window.
    """
    stream = input_ids.reshape(-1)
    n_windows = stream.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise LlmpruneError(f"text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    return stream[: n_windows * seqlen].view(n_windows, seqlen)


def _window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of ``[b, seqlen]`` windows from their ``[b, seqlen, vocab]`` logits."""
    return float(F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
    ))


def _score_windows(model, windows: torch.Tensor, batch_size: int, logits_of: Callable[[torch.Tensor], torch.Tensor],
                   desc: str, unit: str, progress: bool) -> tuple[float, int, float]:
    """``(mean NLL, predicted tokens, seconds)`` over ``windows``, ``batch_size`` windows per ``logits_of`` call."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit=unit, disable=not progress):
        batch = windows[i : i + batch_size].to(device)
        total_nll += _window_nll(logits_of(batch), batch)
        total_tokens += batch.shape[0] * (windows.shape[1] - 1)
    return total_nll / total_tokens, total_tokens, time.perf_counter() - t0


@torch.no_grad()
def perplexity(
    model,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity over non-overlapping ``seqlen`` windows.

    Args:
        model: causal LM (on its device).
        input_ids: ``[1, N]`` token stream.
        seqlen: window length.
        max_windows: evaluate only the first windows (None = all).
        batch_size: windows per forward pass.
        progress: show a progress bar.

    Returns:
        :class:`PerplexityResult`.
    """
    windows = eval_windows(input_ids, seqlen, max_windows)

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, use_cache=False).logits.float()

    mean, tokens, seconds = _score_windows(model, windows, batch_size, logits_of, "perplexity", "batch", progress)
    return PerplexityResult(math.exp(mean), mean, tokens, windows.shape[0], seqlen, seconds)


@torch.no_grad()
def perplexity_with_cache(
    model,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    k_sparsity: float | None = 0.7,
    v_sparsity: float | None = None,
    window: int = DEFAULT_KV_WINDOW,
    backend: str = "auto",
    progress: bool = True,
    allocation=None,
) -> CachePerplexityResult:
    """WikiText-style perplexity with the pruned bitmap cache active.

    Same windows as :func:`perplexity` (non-overlapping ``seqlen`` windows, mean NLL over ``seqlen - 1``
    predictions each), but each window is fed in chunks of exactly ``window`` tokens through a fresh
    :class:`BitmapKVCache`. Chunk ``j`` attends to tokens ``[0, j * window)`` pruned and compressed (they were
    flushed at the start of the update) and to itself dense and causal: every query sees exactly the cache it
    would see in token-by-token decode, at ``seqlen / window`` forward passes instead of ``seqlen``.

    Args:
        model: causal LM (on its device).
        input_ids: ``[1, N]`` token stream.
        seqlen: window length.
        max_windows: evaluate only the first windows (None = all).
        k_sparsity, v_sparsity: cache sparsity of K and V (``v_sparsity`` None = ``k_sparsity``; both None with
            an ``allocation``: its means).
        window: recent tokens the cache keeps dense (also the chunk length).
        backend: :class:`BitmapKVCache` backend.
        progress: show a progress bar.
        allocation: per-layer / per-head keep counts (:class:`BitmapKVCache` ``allocation``: a ``KVBudgets``,
            a ``kv_budgets.json`` path, or None / ``"uniform"``); its means must equal the sparsities.

    Returns:
        :class:`CachePerplexityResult` (the byte ratios are those of the last window's cache).
    """
    if isinstance(allocation, (str, os.PathLike)) and allocation != "uniform":
        allocation = load_budgets(allocation)  # read once, not per window
    # Validates the settings (and the allocation against the model) before any window runs.
    probe = BitmapKVCache(model.config, k_sparsity, v_sparsity, window=window, backend=backend, allocation=allocation)
    k_sparsity, v_sparsity = probe.k_sparsity, probe.v_sparsity
    windows = eval_windows(input_ids, seqlen, max_windows)
    ratios = [float("nan"), float("nan")]
    kw = cache_argument(model)  # `cache=` where transformers deprecates `past_key_values=`

    def logits_of(ids: torch.Tensor) -> torch.Tensor:  # one window, chunk by chunk through a fresh cache
        cache = BitmapKVCache(model.config, k_sparsity, v_sparsity, window=window, backend=backend,
                              allocation=allocation)
        logits = [model(input_ids=ids[:, s : s + window], **{kw: cache}, use_cache=True).logits.float()
                  for s in range(0, seqlen, window)]
        ratios[:] = cache.compression_ratio(), cache.compression_ratio(element_size=2)
        return torch.cat(logits, dim=1)

    mean, tokens, seconds = _score_windows(model, windows, 1, logits_of, "perplexity (kv cache)", "window", progress)
    return CachePerplexityResult(
        math.exp(mean), mean, tokens, windows.shape[0], seqlen, seconds,
        float(k_sparsity), float(v_sparsity), window, *ratios,
    )
