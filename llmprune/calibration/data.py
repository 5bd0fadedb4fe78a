"""Calibration data: text sources -> ``[nsamples, seqlen]`` token ids.

Protocol (documented in the README): documents are shuffled with ``seed``,
tokenized without special tokens and joined with the EOS token into one
stream; ``nsamples`` windows of ``seqlen`` tokens then start at seeded random
offsets. This is the SparseGPT/Wanda sampling, made robust to documents
shorter than ``seqlen`` (most of C4).

Sources:
    * ``auto``: C4 from the Hub when reachable, otherwise ``self`` (logged).
    * ``c4``: ``allenai/c4``, English validation shard 0 (~45k documents).
    * ``wikitext2``: ``wikitext-2-raw-v1`` train split.
    * ``self``: data-free fallback; sequences sampled from the model itself
      (top-p 0.95 from BOS). Slow for big models on CPU.
    * a local ``.txt``, ``.jsonl``/``.json`` or ``.parquet`` file.
    * any other ``datasets`` name (with ``dataset_config``/``split``/``text_field``).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import replace
from pathlib import Path

import torch

from llmprune.config import CalibConfig
from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

_FILE_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The stream is built from at most this many times the tokens needed.
_STREAM_FACTOR = 4


def hub_offline() -> bool:
    from llmprune.model.network import hub_reachable

    return not hub_reachable()


def _load_file_texts(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    if suffix == ".parquet" and path.stat().st_size > 0:
        return _load_parquet_texts(path, text_field)
    import datasets

    fmt = _FILE_FORMATS.get(suffix)
    if fmt is None:
        raise LlmpruneError(f"unsupported calibration file type {suffix!r} (use .txt, .jsonl, .json or .parquet)")
    if path.stat().st_size == 0:
        return []
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise LlmpruneError(f"cannot read calibration file {path}: {str(exc).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise LlmpruneError(
            f"calibration file {path} has no {text_field!r} column (columns: {', '.join(ds.column_names)})"
        )
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def _load_parquet_texts(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` column of a parquet file, read with pyarrow alone: the same rows in the same order as
    ``datasets.load_dataset("parquet", ...)``, without importing ``datasets`` or building its Arrow cache
    (seconds of the default compress on a CPU)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if text_field not in names:
            raise LlmpruneError(f"calibration file {path} has no {text_field!r} column (columns: {', '.join(names)})")
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except LlmpruneError:
        raise
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise LlmpruneError(f"cannot read calibration file {path}: {str(exc).splitlines()[0]}") from None
    return [t for t in column if isinstance(t, str) and t.strip()]


def _load_hub_texts(cfg: CalibConfig) -> list[str]:
    import datasets

    if cfg.source == "c4":
        ds = datasets.load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        field = "text"
    elif cfg.source == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        return ["\n\n".join(ds["text"])]
    else:
        ds = datasets.load_dataset(cfg.source, cfg.dataset_config, split=cfg.split)
        field = cfg.text_field
    if field not in ds.column_names:
        raise LlmpruneError(f"dataset {cfg.source!r} has no {field!r} column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


def token_windows(
    texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, source: str
) -> torch.Tensor:
    """Sample ``nsamples`` random ``seqlen``-token windows from documents.

    Returns:
        ``[nsamples, seqlen]`` int64 token ids.
    """
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    need = nsamples * seqlen * _STREAM_FACTOR
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    chunk = 64
    for start in range(0, len(order), chunk):
        docs = [texts[i] for i in order[start : start + chunk]]
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < seqlen:
        raise LlmpruneError(
            f"calibration data {source} has only {len(stream)} tokens, fewer than seqlen={seqlen}"
        )
    data = torch.tensor(stream, dtype=torch.long)
    starts = [rng.randint(0, len(stream) - seqlen) for _ in range(nsamples)]
    return torch.stack([data[s : s + seqlen] for s in starts])


@torch.no_grad()
def sample_from_model(
    model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 32, progress: bool = True
) -> torch.Tensor:
    """Data-free calibration: ``nsamples`` sequences sampled from the model itself.

    ``progress``: a bar over the sampled tokens (minutes for a big model on CPU: not silent).

    Returns:
        ``[nsamples, seqlen]`` int64 token ids (BOS first when the tokenizer has one).
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Tick(StoppingCriteria):  # called once per generated token: advances the bar, never stops
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            bar.update(input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    bar = tqdm(total=nsamples * (seqlen - 1), desc="calibration: sampling from the model", unit="tok",
               unit_scale=True, disable=not progress)
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - i)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
        seq = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_p=0.95,
            temperature=1.0,
            top_k=0,
            max_new_tokens=seqlen - 1,
            min_new_tokens=seqlen - 1,
            pad_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_Tick()]),
        )
        out.append(seq[:, :seqlen].cpu())
    bar.close()
    return torch.cat(out)


def clip_seqlen(cfg: CalibConfig, model_config) -> CalibConfig:
    """``cfg`` with ``seqlen`` at most the model's context (``max_position_embeddings``); logged when clipped.

    Args:
        cfg: the recipe's calibration config.
        model_config: the model's ``transformers`` config (a config without ``max_position_embeddings``
            leaves ``seqlen`` as it is).
    """
    max_ctx = getattr(model_config, "max_position_embeddings", None) or cfg.seqlen
    if cfg.seqlen <= max_ctx:
        return cfg
    log.warning("seqlen %d exceeds the model context %d; using %d", cfg.seqlen, max_ctx, max_ctx)
    return CalibConfig(**{**cfg.to_dict(), "seqlen": max_ctx})


def load_calibration(cfg: CalibConfig, tokenizer, model=None, *, progress: bool = True) -> torch.Tensor:
    """Calibration token ids for ``cfg`` (:func:`load_calibration_resolved` without the resolved config)."""
    return load_calibration_resolved(cfg, tokenizer, model, progress=progress)[0]


def extend_calibration(ids: torch.Tensor, cfg: CalibConfig, n: int, tokenizer, model=None, *,
                       progress: bool = False) -> torch.Tensor:
    """``n`` calibration sequences: the first ``n`` rows of ``ids``, or all of them followed by ``n - len(ids)``
    more drawn from ``cfg``'s source with the next seed (``cfg.seed + 1``; ``cfg`` as resolved, e.g. ``c4``).

    The end-to-end distillation trains on these (``recover.distill_nsamples``), so it can see text the pruning
    statistics did not.

    Args:
        ids: ``[nsamples, seqlen]`` calibration token ids drawn with ``cfg``.
        n: sequences wanted.

    Returns:
        ``[n, seqlen]`` int64 token ids.
    """
    if n <= ids.shape[0]:
        return ids[:n]
    extra, _ = load_calibration_resolved(replace(cfg, nsamples=n - ids.shape[0], seed=cfg.seed + 1), tokenizer, model,
                                         progress=progress)
    log.info("distillation data: %d calibration sequences + %d drawn with seed %d", ids.shape[0], extra.shape[0],
             cfg.seed + 1)
    return torch.cat([ids, extra.to(ids.dtype)])


def load_calibration_resolved(
    cfg: CalibConfig, tokenizer, model=None, *, progress: bool = True
) -> tuple[torch.Tensor, CalibConfig]:
    """Calibration token ids for ``cfg``, and ``cfg`` with the source they came from (``auto`` resolved to
    ``c4`` or ``self``), which is what a checkpoint records.

    Args:
        cfg: calibration config (``seqlen`` already clipped to the model's context).
        tokenizer: the model's tokenizer.
        model: needed only for ``source="self"`` (or ``auto`` offline).
        progress: a progress bar while sampling from the model (``self``).

    Returns:
        ``([cfg.nsamples, cfg.seqlen]`` int64 token ids, the config with the resolved source).

    Raises:
        LlmpruneError: unreadable/empty files, unknown datasets.
    """
    source = cfg.source
    if source != "auto":
        return _load(cfg, tokenizer, model, progress), cfg
    if not hub_offline():
        try:
            texts = _load_hub_texts(CalibConfig(source="c4"))
            log.info("calibration: C4 validation shard 0 from the Hub")
            ids = token_windows(texts, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, "c4")
            return ids, replace(cfg, source="c4")
        except Exception as exc:  # offline or Hub error: fall back to data-free calibration
            log.warning("C4 is unreachable (%s); calibrating on text sampled from the model", type(exc).__name__)
    else:
        log.warning("Hub offline; calibrating on text sampled from the model")
    resolved = replace(cfg, source="self")
    return _load(resolved, tokenizer, model, progress), resolved


def _load(cfg: CalibConfig, tokenizer, model, progress: bool = True) -> torch.Tensor:
    """Token ids of a source other than ``auto``."""
    source = cfg.source
    path = Path(os.path.expanduser(source))
    if path.suffix.lower() in _FILE_FORMATS or path.exists():
        if not path.is_file():
            raise LlmpruneError(f"calibration file not found: {source}")
        texts = _load_file_texts(path, cfg.text_field)
        if not texts:
            raise LlmpruneError(f"calibration file {source} contains no text")
        log.info("calibration: %d documents from %s", len(texts), path)
        return token_windows(texts, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, source)
    if source == "self":
        if model is None:
            raise LlmpruneError("calibration source 'self' needs the model")
        log.info("calibration: sampling %d x %d tokens from the model", cfg.nsamples, cfg.seqlen)
        return sample_from_model(model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, progress=progress)
    if hub_offline():
        raise LlmpruneError(f"calibration dataset {source!r} needs the Hub, which is offline (HF_HUB_OFFLINE)")
    try:
        texts = _load_hub_texts(cfg)
    except LlmpruneError:
        raise
    except Exception as exc:
        raise LlmpruneError(f"cannot load calibration dataset {source!r}: {str(exc).splitlines()[0]}") from None
    if not texts:
        raise LlmpruneError(f"calibration dataset {source!r} contains no text")
    return token_windows(texts, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, source)


def check_calib_source(cal: CalibConfig) -> None:
    """A calibration source that names a file must be one (before the model is loaded)."""
    path = Path(os.path.expanduser(cal.source))
    if (path.suffix.lower() in (".txt", ".jsonl", ".json", ".parquet") or path.exists()) and not path.is_file():
        raise LlmpruneError(f"calibration file not found: {cal.source}")
