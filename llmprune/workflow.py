"""The whole loop from Python, as the CLI does it: compress (a model in memory or a path), save, perplexity,
evaluate, bench, convert, push.

``llmprune.compress(model=..., recipe=..., calib=...)`` follows the ``oneshot`` habit of llm-compressor: the
model may be a loaded ``nn.Module`` (pruned in place, saved when ``output`` is given) or a reference
(alias, directory, Hub id: :func:`llmprune.api.compress`, which streams big models). A pruned model in memory is
saved with its ``llmprune.json`` by :func:`save`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import api
from llmprune.calibration.data import clip_seqlen, extend_calibration, load_calibration_resolved
from llmprune.config import CalibConfig, PruneConfig, Recipe
from llmprune.errors import ConfigError
from llmprune.evaluate.lm_eval import evaluate as _lm_eval
from llmprune.evaluate.perplexity import PerplexityResult, token_stream, wikitext2_text
from llmprune.evaluate.perplexity import perplexity as _perplexity
from llmprune.formats.checkpoint import read_metadata, save_checkpoint
from llmprune.formats.metadata import build_metadata
from llmprune.model.access import decoder_layers, linear_modules
from llmprune.model.loading import DEFAULT_MODEL, cache_dir, load_tokenizer
from llmprune.model.structured import is_nonuniform
from llmprune.prune.registry import method_for_config
from llmprune.prune.report import CompressResult, ModuleReport, PruneReport
from llmprune.recipe import load_recipe
from llmprune.runtime.load import load_model

RecipeLike = Recipe | PruneConfig | Sequence[PruneConfig] | str | os.PathLike
CalibLike = torch.Tensor | CalibConfig | str | os.PathLike | None


def as_recipe(recipe: RecipeLike | None) -> Recipe:
    """A :class:`Recipe` from a recipe, one config, a list of stage configs, a YAML file or a shipped name."""
    if recipe is None:
        raise ConfigError("recipe is required: a Recipe, a method config such as WandaConfig(sparsity='2:4'), "
                          "a YAML file or a shipped recipe name (llmprune recipes)")
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, PruneConfig):
        return Recipe(stages=[recipe])
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    stages = list(recipe)
    if not stages or not all(isinstance(s, PruneConfig) for s in stages):
        raise ConfigError(f"recipe: expected method configs, got {[type(s).__name__ for s in stages]}")
    return Recipe(stages=stages)


def _with_calibration(recipe: Recipe, calib: CalibLike) -> Recipe:
    """``recipe`` with ``calib`` (a source name/file or a :class:`CalibConfig`) as its calibration."""
    if calib is None or isinstance(calib, torch.Tensor):
        return recipe
    cal = calib if isinstance(calib, CalibConfig) else dataclasses.replace(recipe.calibration, source=os.fspath(calib))
    return dataclasses.replace(recipe, calibration=cal)


def compress(
    model: nn.Module | str | os.PathLike | None,
    recipe: RecipeLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    calib: CalibLike = None,
    tokenizer=None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> CompressResult:
    """Prune ``model`` with ``recipe`` and save it to ``output``.

    Args:
        model: a loaded causal LM (pruned in place) or a reference (alias, directory, Hub id; ``None``: the
            default model), loaded and saved by :func:`llmprune.api.compress` (``kwargs`` go there: ``dtype``,
            ``low_memory``, ``resume`` ...).
        recipe: a :class:`Recipe`, a method config, a list of stage configs, a YAML file or a shipped recipe name.
        output: the checkpoint directory; required for a reference, optional for a model in memory (not saved
            when None).
        calib: ``[nsamples, seqlen]`` token ids (model in memory only), a source (``c4``, ``self``, a file,
            a datasets name) or a :class:`CalibConfig`; default: the recipe's calibration.
        tokenizer: the model's tokenizer (model in memory: needed to read a text source and saved beside it;
            default: the one of ``model.config._name_or_path`` when that is a local directory or alias).

    Returns:
        :class:`~llmprune.prune.report.CompressResult` (``output`` is None for an unsaved model in memory).
    """
    rec = _with_calibration(as_recipe(recipe), calib)
    if not isinstance(model, nn.Module):
        if isinstance(calib, torch.Tensor):
            raise ConfigError("calib token ids need a model in memory; for a model reference give a calibration "
                              "source (a file, c4, self, a datasets name)")
        if output is None:
            raise ConfigError("output is required when the model is a reference (alias, directory, Hub id)")
        ref = None if model is None else os.fspath(model)
        return api.compress(ref, rec, output, device=device, overwrite=overwrite, progress=progress, **kwargs)
    if kwargs:
        raise ConfigError(f"{', '.join(sorted(kwargs))}: only for a model reference, not a model in memory")
    ids, cal, distill_ids = None, None, None
    e2e = rec.recover.e2e if rec.recover is not None else None
    if any(method_for_config(s).needs_calibration for s in rec.stages) or rec.recover is not None:
        if isinstance(calib, torch.Tensor):
            ids = calib
            if e2e is not None and e2e.distill_nsamples is not None:
                if e2e.distill_nsamples > ids.shape[0]:
                    raise ConfigError(f"recover.distill_nsamples = {e2e.distill_nsamples} exceeds the {ids.shape[0]} "
                                      "calibration sequences given as token ids; give a calibration source to draw "
                                      "more")
                distill_ids = ids[: e2e.distill_nsamples]
        else:
            tok = tokenizer if tokenizer is not None else _tokenizer_of(model)
            cal = clip_seqlen(rec.calibration, model.config)
            ids, cal = load_calibration_resolved(cal, tok, model, progress=progress)
            if e2e is not None and e2e.distill_nsamples is not None:
                distill_ids = extend_calibration(ids, cal, e2e.distill_nsamples, tok, model, progress=progress)
    report = api.prune(model, rec.stages, ids, device=device, batch_size=rec.calibration.batch_size,
                       progress=progress, recover=rec.recover, distill_calib=distill_ids)
    if output is None:
        return CompressResult(None, report, {})
    path = save(model, output, tokenizer, recipe=rec, report=report, calibration=cal, overwrite=overwrite)
    return CompressResult(path, report, read_metadata(path) or {})


def _tokenizer_of(model: nn.Module):
    ref = getattr(model.config, "_name_or_path", None)
    if not ref:
        raise ConfigError("tokenizer is required: this model does not say where it was loaded from")
    return load_tokenizer(ref)


def _base_of(model: nn.Module) -> str:
    """Where ``model`` came from (``config._name_or_path``); the embedded model's cache folder is its alias, as
    ``llmprune compress smollm2-135m`` records it."""
    ref = str(getattr(model.config, "_name_or_path", "") or "unknown")
    path = Path(ref).expanduser()
    if path.name.startswith(DEFAULT_MODEL) and path.parent.resolve() == (cache_dir() / "models").resolve():
        return DEFAULT_MODEL
    return ref


def measured_report(model: nn.Module) -> PruneReport:
    """A :class:`PruneReport` measured from the weights (zeros of each decoder-layer linear; no timings)."""
    modules = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_modules(layer).items():
            w = lin.weight
            sparsity = float((w == 0).sum()) / w.numel() if w.numel() else 0.0
            modules.append(ModuleReport(f"model.layers.{i}.{name}", i, tuple(w.shape), sparsity, 0.0, "measured"))
    return PruneReport(modules=modules)


def save(
    model: nn.Module,
    output: str | os.PathLike,
    tokenizer=None,
    *,
    recipe: RecipeLike,
    report: PruneReport | None = None,
    calibration: CalibConfig | None = None,
    format: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    record_paths: str = "relative",
) -> Path:
    """Save a model pruned in memory as an llmprune checkpoint (weights, tokenizer, ``llmprune.json``).

    Args:
        model: the pruned model.
        output: checkpoint directory (refused when it exists unless ``overwrite``; written atomically).
        tokenizer: saved beside the weights (None: none saved).
        recipe: what it was pruned with (a Recipe, one config or a list): recorded in ``llmprune.json``.
        report: what :func:`llmprune.prune` returned (None: sparsity measured from the weights).
        calibration: the calibration used (None: the recipe's, recorded as given).
        format: ``dense``, ``packed`` ... (default: the recipe's; per-layer sizes save as ``structured``).
        base_model: recorded as the base model (default: ``model.config._name_or_path``; the embedded model: its
            alias).
        record_paths: ``relative`` (default) or ``absolute`` local paths in ``llmprune.json``.
    """
    rec = as_recipe(recipe)
    fmt = format or rec.save.format
    if fmt == "dense" and is_nonuniform(model):  # per-layer sizes (cfsp): plain "dense" cannot describe them
        fmt = "structured"
    base = base_model or _base_of(model)
    output = Path(output).expanduser()
    metadata = build_metadata(
        base_model=str(base), recipe=rec, calibration=calibration or rec.calibration,
        report=report if report is not None else measured_report(model), dtype=next(model.parameters()).dtype,
        command="llmprune.save (Python)", format=fmt if fmt != rec.save.format else None, output=output,
        record_paths=record_paths,
    )
    return save_checkpoint(model, tokenizer, output, metadata=metadata, format=fmt, overwrite=overwrite)


def _loaded(model, tokenizer, device=None, dtype: str = "auto"):
    """(model, tokenizer): a reference is loaded as llmprune loads it (any checkpoint format)."""
    if isinstance(model, nn.Module):
        return model, tokenizer if tokenizer is not None else _tokenizer_of(model)
    ref = None if model is None else os.fspath(model)
    return load_model(ref, dtype=dtype, device=device), tokenizer if tokenizer is not None else load_tokenizer(ref)


def perplexity(
    model,
    tokenizer=None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    *,
    data_path: str | os.PathLike | None = None,
    text: str | None = None,
) -> PerplexityResult:
    """WikiText-2 perplexity (non-overlapping ``seqlen`` windows), as ``llmprune ppl``.

    Args:
        model: a loaded model or a reference (alias, directory, Hub id).
        tokenizer: its tokenizer, or ``[1, N]`` token ids to score directly (the older form).
        data_path: ``wiki.test.raw.txt`` (offline); default ``text``, else WikiText-2 through ``datasets``.
        text: score this text instead of WikiText-2.
    """
    if isinstance(tokenizer, torch.Tensor):  # perplexity(model, ids, ...) keeps working
        ids = tokenizer
        model = model if isinstance(model, nn.Module) else load_model(os.fspath(model))
    else:
        model, tok = _loaded(model, tokenizer)
        ids = token_stream(tok, text if text is not None else wikitext2_text(data_path))
    return _perplexity(model, ids, seqlen, max_windows, batch_size, progress=progress)


def evaluate(model, tokenizer=None, tasks: str | Sequence[str] = (), **kwargs: Any) -> dict:
    """lm-eval on ``model`` (loaded, or a reference loaded as llmprune loads it), as ``llmprune eval``;
    ``kwargs``: :func:`llmprune.evaluate.lm_eval.evaluate` (``limit``, ``data_dir``, ``num_fewshot`` ...)."""
    if not tasks:
        raise ConfigError("tasks is required, e.g. tasks=['arc_easy']")
    model, tok = _loaded(model, tokenizer)
    return _lm_eval(model, tok, tasks, **kwargs)
