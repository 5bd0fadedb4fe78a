"""Results stored with a checkpoint: ``eval_results.json``, merged by key, read by the model card.

Sections used by llmprune: ``lm_eval`` (key: task and runtime options), ``ppl`` (key: dataset and protocol),
``bench``; the dense baseline's numbers go under ``baseline``. See :mod:`llmprune.publish.modelcard`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from llmprune.errors import ConfigError
from llmprune.formats.reading import read_json

RESULTS_FILE = "eval_results.json"


def jsonable(obj: Any) -> Any:
    """``obj`` with every key a string and every leaf a JSON scalar (0-d tensors/arrays unwrapped, rest ``str``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return str(obj)


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (the ``date`` of stored entries)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def result_key(name: str, runtime: dict[str, Any] | None = None) -> str:
    """``name`` with the runtime options appended, e.g. ``arc_easy[kv_sparsity=0.5]``."""
    opts = ",".join(f"{k}={v}" for k, v in sorted((runtime or {}).items()) if v is not None)
    return f"{name}[{opts}]" if opts else name


def is_checkpoint_dir(model_ref: str | os.PathLike | None) -> bool:
    """True for a directory written by llmprune (``config.json`` and ``llmprune.json``): results go there."""
    if model_ref is None or not Path(model_ref).is_dir():
        return False
    return (Path(model_ref) / "config.json").is_file() and (Path(model_ref) / "llmprune.json").is_file()


def read_results(directory: str | os.PathLike) -> dict[str, Any]:
    """``directory/eval_results.json`` (empty when absent).

    Raises:
        LlmpruneError: when the file is not a UTF-8 JSON object.
    """
    data = read_json(Path(directory) / RESULTS_FILE, what=RESULTS_FILE)
    return {} if data is None else data


def record_results(directory: str | os.PathLike, section: str, entries: dict[str, Any],
                   *, baseline: bool = False) -> Path:
    """Merge ``entries`` into ``eval_results.json[section]`` (or ``[baseline][section]``) by key.

    The file is rewritten atomically. Returns its path.
    """
    path = Path(directory) / RESULTS_FILE
    data = read_results(directory)
    target = data.setdefault("baseline", {}) if baseline else data
    target.setdefault(section, {}).update(jsonable(entries))
    tmp = path.with_name(f".{RESULTS_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def ppl_entry(res: dict[str, Any], *, model: str, data_path: str | None) -> dict[str, dict]:
    """``eval_results.json`` ``ppl`` entry for a :func:`llmprune.perplexity` result dict."""
    key = f"wikitext2[seqlen={res.get('seqlen')},windows={res.get('windows')}]"
    return {key: {"dataset": "wikitext2", **res, "data_path": data_path, "model": model, "date": utc_now()}}


def record_ppl(model_ref: str | None, res: dict[str, Any], data_path: str | None, *,
               baseline_of: str | None = None) -> Path | None:
    """Store a ``llmprune ppl`` result with the checkpoint when ``model_ref`` is a checkpoint directory.

    With ``baseline_of=DIR`` the result is stored as the dense baseline of checkpoint ``DIR`` instead.
    Returns the results file written, or None.
    """
    entry = ppl_entry(res, model=str(model_ref or "smollm2-135m"), data_path=data_path)
    if baseline_of is not None:
        if not is_checkpoint_dir(baseline_of):
            raise ConfigError(f"--baseline-of {baseline_of} is not a checkpoint directory")
        return record_results(baseline_of, "ppl", entry, baseline=True)
    if not is_checkpoint_dir(model_ref):
        return None
    return record_results(model_ref, "ppl", entry)
