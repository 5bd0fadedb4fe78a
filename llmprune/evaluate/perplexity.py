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

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("ppl", "nll", "tokens", "windows", "seqlen", "seconds")}


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

    Returns:
        :class:`PerplexityResult`.
    """
    windows = eval_windows(input_ids, seqlen, max_windows)
    n_windows = windows.shape[0]
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    t0 = time.perf_counter()
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch.shape[0] * (seqlen - 1)
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, n_windows, seqlen, time.perf_counter() - t0)
