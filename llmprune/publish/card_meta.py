"""The model card's metadata and side files, built with ``huggingface_hub`` (``ModelCardData``/``EvalResult``):
license and language inherited from the base model, the calibration dataset, ``model-index`` results, accuracy
recovery against the baseline, and ``recipe.yaml`` (the recipe beside the card, reusable with ``--recipe``)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from llmprune.errors import LlmpruneError
from llmprune.evaluate.lm_eval import MAIN_METRIC
from llmprune.formats.checkpoint import read_metadata

CARD_FILE = "README.md"
RECIPE_FILE = "recipe.yaml"
#: Licenses of base models whose card cannot be read offline (local aliases): inherited by the pruned model.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": ("apache-2.0", ["en"])}
#: Calibration sources -> the Hub dataset they read (``datasets`` metadata).
CALIB_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}


def calib_dataset(source) -> str | None:
    """The Hub dataset a calibration source names (``c4`` -> ``allenai/c4``, ``user/name`` as is), or None."""
    src = str(source or "")
    return CALIB_DATASETS.get(src) or (src if src.count("/") == 1 and not Path(src).exists() else None)


def recovery(value, baseline) -> str:
    """``value`` as a percentage of the dense ``baseline`` (accuracy recovery), or a dash."""
    if not isinstance(value, (int, float)) or not isinstance(baseline, (int, float)) or not baseline:
        return "—"
    return f"{100 * value / baseline:.1f}%"


def base_card_data(base: str | None, directory: Path) -> tuple[str | None, list[str] | None]:
    """``(license, language)`` of the base model: its local card's metadata, else a known Hub model's."""
    from huggingface_hub import ModelCard

    meta = read_metadata(directory) or {}
    try:
        from llmprune.formats.metadata import resolve_base_model

        local = Path(resolve_base_model(directory, meta))
    except LlmpruneError:
        local = None
    if local is not None and (local / CARD_FILE).is_file():
        try:
            data = ModelCard.load(local / CARD_FILE, ignore_metadata_errors=True).data
            lang = data.language
            return data.license, ([lang] if isinstance(lang, str) else lang)
        except Exception:  # a hand-written README without (valid) metadata
            pass
    return KNOWN_LICENSES.get(base or "", (None, None))


def eval_results(res: dict, name: str) -> list:
    """``model-index`` entries (``huggingface_hub.EvalResult``) for the stored perplexity and lm-eval numbers."""
    from huggingface_hub import EvalResult

    out = []
    for key, e in sorted((res.get("ppl") or {}).items()):
        if isinstance(e, dict) and isinstance(e.get("ppl"), (int, float)):
            out.append(EvalResult(task_type="text-generation", dataset_type="wikitext",
                                  dataset_name=str(e.get("dataset", key)), dataset_config="wikitext-2-raw-v1",
                                  dataset_split="test", metric_type="perplexity", metric_value=float(e["ppl"]),
                                  metric_name=f"perplexity ({e.get('windows')} x {e.get('seqlen')} tokens)"))
    for key, e in sorted((res.get("lm_eval") or {}).items()):
        if not isinstance(e, dict):
            continue
        task = e.get("task", key)
        metric = e.get("main_metric") or MAIN_METRIC.get(task) or next(iter(e.get("metrics", {})), None)
        value = (e.get("metrics") or {}).get(metric)
        if isinstance(value, (int, float)) and metric:
            out.append(EvalResult(task_type="text-generation", dataset_type=str(task), dataset_name=str(key),
                                  metric_type=str(metric).split(",")[0], metric_value=float(value),
                                  metric_name=f"{metric} (lm-eval, limit {e.get('limit')})"))
    return out


def recipe_yaml(meta: dict) -> str:
    """The recipe that made the checkpoint, as YAML for ``--recipe`` (``save.format``: the format it is in now,
    after a ``convert``); local paths as the card shows them."""
    recipe = dict(meta.get("recipe") or {})
    fmt = meta.get("format")
    if fmt and isinstance(recipe.get("save"), dict):
        recipe["save"] = {**recipe["save"], "format": fmt if fmt != "structured" else "dense"}
    return yaml.safe_dump(recipe, sort_keys=False)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
