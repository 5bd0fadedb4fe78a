"""lm-eval harness on the model as llmprune loads it, with offline copies of its standard tasks when given data.

* :func:`evaluate` runs ``lm_eval.simple_evaluate`` through lm-eval's Python API on an **already-loaded**
  model (``HFLM(pretrained=model, tokenizer=tok)``), so packed 2:4 linears and runtime features
  (:mod:`llmprune.runtime.options`) are what gets scored, not a re-load by lm-eval.
* Offline tasks: with a data directory, the shipped copies of lm-eval's standard tasks
  (:mod:`llmprune.evaluate.task_files`) are written into an include directory and override lm-eval's built-in
  tasks of the same name. Without a data directory the built-in (Hub) tasks are used.
* :func:`lm_eval_entries` turns lm-eval's results into ``eval_results.json`` entries
  (:mod:`llmprune.evaluate.results`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.evaluate.results import jsonable, result_key, utc_now
from llmprune.evaluate.task_files import DATA_ENV, resolve_data_dir, write_task_dir

log = logging.getLogger(__name__)

# The headline metric per task (what tables and the model card show first).
MAIN_METRIC = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "boolq": "acc",
    "copa": "acc",
    "winogrande": "acc",
    "lambada_openai": "acc",
}


# --------------------------------------------------------------------------- evaluation


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from ``"a,b"`` or a list; at least one.

    Raises:
        ConfigError: when no name is given.
    """
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ConfigError("--tasks: give at least one task name")
    return names


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    data_dir: str | os.PathLike | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    seed: int = 1234,
    log_samples: bool = False,
    act_scoring: str = "forward",
    act_correction: int | None = None,
) -> dict:
    """Run lm-eval on an already-loaded model.

    Args:
        model: a loaded causal LM (``llmprune.load(...)``), runtime features already applied.
        tokenizer: its tokenizer.
        tasks: names (comma string or list); lm-eval groups and tags work too.
        limit: examples per task (int) or fraction (float < 1); None = all.
        batch_size: lm-eval batch size (int or ``"auto"``).
        num_fewshot: few-shot examples (None = the task's default, 0 for the shipped tasks).
        data_dir: directory of offline jsonl copies (default ``$LLMPRUNE_LM_EVAL_DATA``); when set, the shipped
            tasks read from it and override lm-eval's Hub-backed tasks of the same name.
        include_path: extra lm-eval task directories (a user's own YAMLs); they override both.
        seed: lm-eval random seeds.
        log_samples: keep per-sample outputs in the returned dict.
        act_scoring: ``"forward"`` (lm-eval's one forward per request) or ``"decode"``: with activation sparsity,
            each continuation is scored as decode steps after a prefill of the context
            (:mod:`llmprune.evaluate.lm_eval_decode`); implied by ``act_correction``.
        act_correction: with ``"decode"``, the dense model rewrites the KV entries of every ``K`` continuation
            tokens (Sirius-style).

    Returns:
        lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-samples``, ``config`` ...), made
        JSON-serializable, plus ``llmprune``: the offline data dir and include paths used.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise LlmpruneError(f"lm-eval is required for evaluation: pip install lm-eval ({exc})") from None

    names = parse_tasks(tasks)
    includes: list[str] = []
    offline: list[str] = []
    resolved_data = resolve_data_dir(data_dir)
    tmp = None
    if resolved_data is not None:
        tmp = tempfile.TemporaryDirectory(prefix="llmprune-tasks-")
        task_dir, offline = write_task_dir(resolved_data, tmp.name)
        if offline:
            includes.append(str(task_dir))
        else:
            log.warning("no offline task data (*.jsonl) found in %s", resolved_data)
    for p in [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or []):
        if not Path(p).exists():
            raise ConfigError(f"--include-path {p} does not exist")
        includes.append(str(Path(p).resolve()))
    try:
        manager = _task_manager(TaskManager, includes, names)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            hint = "" if resolved_data else f" (offline? pass --data-dir or set ${DATA_ENV})"
            raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}")
        if limit is not None and limit <= 0:
            raise ConfigError(f"--limit must be > 0, got {limit}")
        if act_scoring not in ("forward", "decode"):
            raise ConfigError(f"--act-scoring must be forward or decode, got {act_scoring!r}")
        if act_scoring == "decode" or act_correction is not None:
            from llmprune.evaluate.lm_eval_decode import decode_scoring_lm

            lm = decode_scoring_lm(model, tokenizer, act_correction, batch_size=batch_size)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with _quiet_git_hash():
            results = _simple_evaluate(lm_eval, lm, names, num_fewshot, limit, manager, log_samples, seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if results is None:  # non-zero ranks in distributed runs
        return {}
    results = jsonable(dict(results))
    results["llmprune"] = {
        "data_dir": str(resolved_data) if resolved_data else None,
        "offline_tasks": [n for n in names if n in offline],
        "include_path": [p for p in includes if not (tmp and p.startswith(tmp.name))],
    }
    if getattr(lm, "act_scoring", None):
        results["llmprune"]["act_scoring"] = {**lm.act_scoring, "stats": lm.act_scoring["stats"].to_dict()}
    return results


def _simple_evaluate(lm_eval, lm, names, num_fewshot, limit, manager, log_samples, seed):
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


@contextmanager
def _quiet_git_hash():
    """lm-eval records the git commit of the working directory by running ``git describe`` with the terminal
    as its stderr, which prints ``fatal: not a git repository`` outside a repo. For the call, its
    ``get_git_commit_hash`` runs the same command with stderr captured (same result, lm-eval's files
    untouched)."""
    try:
        import lm_eval.evaluator as evaluator
        from lm_eval.loggers.utils import get_commit_from_path
    except ImportError:  # pragma: no cover - another lm-eval layout: leave it alone
        yield
        return
    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # pragma: no cover
        yield
        return

    def quiet_git_commit_hash():
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        return get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = quiet_git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _task_manager(cls, includes: list[str], names: list[str]):
    """Index only the include dirs when they define every requested task (indexing lm-eval's few thousand
    built-in YAMLs takes seconds to minutes); otherwise the built-ins too (include dirs take precedence)."""
    if includes:
        manager = cls(include_path=includes, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            return manager
    return cls(include_path=includes or None)


def metrics_by_task(results: dict) -> dict[str, dict[str, float]]:
    """``{"arc_easy": {"acc": .., "acc_stderr": .., "acc_norm": ..}, ...}`` from lm-eval results."""
    out = {}
    for task, vals in results.get("results", {}).items():
        metrics = {}
        for key, val in vals.items():
            if key in ("alias", "sample_len") or not isinstance(val, (int, float)) or isinstance(val, bool):
                continue
            metric, _, filt = key.partition(",")
            if filt not in ("none", ""):
                metric = f"{metric},{filt}"
            metrics[metric] = float(val)
        out[task] = metrics
    return out


def format_table(results: dict) -> str:
    """lm-eval's own results table (markdown)."""
    try:
        from lm_eval.utils import make_table

        return make_table(results)
    except Exception:  # pragma: no cover - fall back to a plain listing
        lines = []
        for task, metrics in metrics_by_task(results).items():
            lines.append(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return "\n".join(lines)


def lm_eval_entries(results: dict, *, model: str, runtime: dict | None = None) -> dict[str, dict]:
    """Per-task entries for ``eval_results.json`` (keyed by task name, runtime options appended)."""
    n_samples = results.get("n-samples", {})
    cfg = results.get("config", {})
    date = utc_now()
    out = {}
    for task, metrics in metrics_by_task(results).items():
        ns = n_samples.get(task, {})
        entry = {
            "task": task,
            "metrics": metrics,
            "main_metric": MAIN_METRIC.get(task),
            "limit": cfg.get("limit"),
            "n_samples": ns.get("effective"),
            "num_fewshot": results.get("n-shot", {}).get(task),
            "offline_data": task in results.get("llmprune", {}).get("offline_tasks", []),
            "runtime": dict(runtime or {}),
            "model": model,
            "lm_eval_version": _lm_eval_version(),
            "date": date,
        }
        out[result_key(task, runtime)] = entry
    return out


def _lm_eval_version() -> str | None:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover - a declared dependency
        return None
