"""lm-eval harness on the model as llmprune loads it, offline task copies, results stored with checkpoints.

* :func:`evaluate` runs ``lm_eval.simple_evaluate`` through lm-eval's Python API on an **already-loaded**
  model (``HFLM(pretrained=model, tokenizer=tok)``), so packed 2:4 linears and runtime features are what
  gets scored, not a re-load by lm-eval.
* Offline tasks: ``llmprune/tasks/*.yaml`` are templates of lm-eval's ``arc_easy``, ``arc_challenge``,
  ``boolq``, ``piqa``, ``copa``, ``winogrande``, ``hellaswag`` and ``lambada_openai`` (same names, prompts and
  metrics) reading local jsonl files. :func:`write_task_dir` writes the effective YAMLs (data paths filled
  in) into a directory used as lm-eval ``include_path``; include paths take precedence over lm-eval's
  built-in tasks of the same name. Without a data directory the built-in (Hub) tasks are used.
* Runtime features (``--kv-sparsity``, ``--attn-sparsity``, ...) plug in through :data:`RUNTIME_FEATURES`:
  one :class:`RuntimeFeature` per option, whose ``setup(model, value, options)`` configures the model and may
  return a ``past_key_values`` factory. Wired: ``kv_sparsity`` -> :class:`llmprune.runtime.kvcache.BitmapKVCache`
  (decode cache; lm-eval's loglikelihood requests are single forwards without a cache, so it does not change
  their scores), ``attn_sparsity`` -> :func:`llmprune.runtime.gates.runtime.attach_gates` (active in every forward).
  A feature whose module is not in this build is an error, never a silent no-op.
* :func:`record_results` merges results into ``eval_results.json`` in a checkpoint directory (by key), which
  the model card (:mod:`llmprune.publish.modelcard`) reads.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmprune.errors import ConfigError, LlmpruneError

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
DATA_ENV = "LLMPRUNE_LM_EVAL_DATA"
TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "piqa",
    "copa",
    "winogrande",
    "hellaswag",
    "lambada_openai",
)
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


# --------------------------------------------------------------------------- runtime features


@dataclass
class RuntimeSetup:
    """What the enabled runtime features did to a model.

    Attributes:
        features: human-readable labels, e.g. ``["2:4 packed (210 linears)", "kv bitmap 0.5"]``.
        past_key_values: ``factory(batch_size) -> Cache`` for generation/decoding, or None (HF default).
        options: the option values that were applied (recorded with results).
    """

    features: list[str] = field(default_factory=list)
    past_key_values: Callable[[int], Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeFeature:
    """One runtime option.

    ``module`` is the llmprune module implementing it; ``setup(model, value)`` is called with the imported
    module available, configures ``model`` in place and returns ``None`` or a ``past_key_values`` factory.
    """

    option: str  # key in the options dict / RuntimeConfig field, e.g. "kv_sparsity"
    flag: str  # command-line flag, e.g. "--kv-sparsity"
    module: str  # e.g. "llmprune.runtime.kvcache"
    issue: str  # where it is built (for the error message)
    setup: Callable[[Any, Any, dict], Callable[[int], Any] | None]
    label: Callable[[Any], str]


def _setup_kv(model, value, options):
    """Issue 4: a pruned bitmap KV cache (K and V at ``value``, recent ``kv_window`` tokens dense) for decoding."""
    from llmprune.runtime.kvcache import BitmapKVCache

    window = int(options.get("kv_window") or 32)
    BitmapKVCache(model.config, value, value, window=window)  # validate now, not at the first decode

    def factory(batch_size: int):
        return BitmapKVCache(model.config, value, value, window=window)

    return factory


def _setup_attn(model, value, options):
    """Issue 5: learned attention gates (attached from ``--gates DIR``, or already loaded with the model)."""
    from llmprune.runtime.gates.runtime import attach_gates, gate_runtime

    if options.get("gates"):
        attach_gates(model, Path(options["gates"]).expanduser(), attn_sparsity=value)
        return None
    rt = gate_runtime(model)
    if rt is None:
        raise ConfigError("--attn-sparsity needs attention gates: pass --gates DIR (from llmprune train-gates) "
                          "or load a directory that holds them")
    rt.sparsity, rt.threshold, rt.budget = value, None, None
    return None


RUNTIME_FEATURES: dict[str, RuntimeFeature] = {
    "kv_sparsity": RuntimeFeature(
        "kv_sparsity", "--kv-sparsity", "llmprune.runtime.kvcache", "issue 4 (bitmap KV cache)", _setup_kv,
        lambda v: f"KV bitmap cache, {float(v):.0%} of K/V pruned",
    ),
    "attn_sparsity": RuntimeFeature(
        "attn_sparsity", "--attn-sparsity", "llmprune.runtime.gates.gate", "issue 5 (learned attention gates)", _setup_attn,
        lambda v: f"attention gates, {float(v):.0%} of KV blocks skipped",
    ),
}


# Settings read by a feature's setup (not features themselves): option -> (flag, help).
FEATURE_SETTINGS = {
    "gates": ("--gates", "attention gates directory (llmprune train-gates) for --attn-sparsity"),
    "kv_window": ("--kv-window", "with --kv-sparsity: recent tokens kept dense (default 32)"),
}


def feature_available(option: str) -> bool:
    feat = RUNTIME_FEATURES[option]
    try:
        return importlib.util.find_spec(feat.module) is not None
    except ModuleNotFoundError:
        return False


def add_runtime_arguments(parser) -> None:
    """``--kv-sparsity`` / ``--attn-sparsity`` (shared by eval and bench)."""
    for feat in RUNTIME_FEATURES.values():
        state = "" if feature_available(feat.option) else " [not in this build]"
        parser.add_argument(
            feat.flag, dest=feat.option, type=float, default=None,
            help=f"{feat.label(0.5).replace('50%', 'FRACTION')} (via {feat.module}){state}",
        )
    parser.add_argument("--gates", dest="gates", default=None, metavar="DIR", help=FEATURE_SETTINGS["gates"][1])
    parser.add_argument("--kv-window", dest="kv_window", type=int, default=None, help=FEATURE_SETTINGS["kv_window"][1])


def model_features(model) -> list[str]:
    """Load-time features visible in the model itself (packed 2:4 linears, ...)."""
    out = []
    try:
        from llmprune.runtime.sparse24 import Sparse24Linear
    except ImportError:  # pragma: no cover - issue 3 not in this build
        Sparse24Linear = None
    if Sparse24Linear is not None:
        n = sum(isinstance(m, Sparse24Linear) for m in model.modules())
        if n:
            out.append(f"2:4 packed ({n} linears)")
    return out


def setup_runtime(model, options: dict[str, Any] | None) -> RuntimeSetup:
    """Apply the requested runtime options to ``model``; error clearly for unavailable ones."""
    setup = RuntimeSetup(features=model_features(model))
    factory = None
    for key, value in (options or {}).items():
        if value is None or key in FEATURE_SETTINGS:
            continue
        if key not in RUNTIME_FEATURES:
            raise ConfigError(f"unknown runtime option {key!r} (known: {', '.join(RUNTIME_FEATURES)})")
        feat = RUNTIME_FEATURES[key]
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"{feat.flag} must be in [0, 1), got {value}")
        if not feature_available(key):
            raise ConfigError(
                f"{feat.flag} needs {feat.module} ({feat.issue}), which is not part of this llmprune build"
            )
        made = feat.setup(model, value, options)
        if made is not None:
            if factory is not None:
                raise ConfigError("two runtime features both provide a KV cache; enable one of them")
            factory = made
        setup.features.append(feat.label(value))
        setup.options[key] = value
    for key, (flag, _) in FEATURE_SETTINGS.items():
        if (options or {}).get(key) is not None:
            owner = {"gates": "attn_sparsity", "kv_window": "kv_sparsity"}[key]
            if options.get(owner) is None:
                raise ConfigError(f"{flag} needs {RUNTIME_FEATURES[owner].flag}")
            setup.options[key] = options[key]
    setup.past_key_values = factory
    return setup


# --------------------------------------------------------------------------- offline tasks


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``--data-dir`` or ``$LLMPRUNE_LM_EVAL_DATA`` (None when neither is set)."""
    raw = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if raw is None:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        src = "--data-dir" if data_dir is not None else f"${DATA_ENV}"
        raise ConfigError(f"{src}: {raw} is not a directory")
    return path


def write_task_dir(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                   tasks: Sequence[str] | None = None) -> tuple[Path, list[str]]:
    """Write the offline task YAMLs whose jsonl exists in ``data_dir`` into ``out_dir`` (default: a temp dir).

    Returns:
        ``(include_dir, task_names_written)``; pass ``include_dir`` to lm-eval as ``--include_path`` /
        ``TaskManager(include_path=...)``.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="llmprune-tasks-"))
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(tasks) if tasks else list(OFFLINE_TASKS)
    written = []
    for name in wanted:
        template = TASKS_DIR / f"{name}.yaml"
        data = data_dir / f"{name}.jsonl"
        if not template.is_file() or not data.is_file():
            continue
        cfg = yaml.safe_load(template.read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        for split, value in files.items():
            files[split] = value.replace("@DATA_DIR@", str(data_dir))
        header = f"# generated by llmprune from {template.name}; data: {data}\n"
        (out / f"{name}.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        written.append(name)
    return out, written


# --------------------------------------------------------------------------- evaluation


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
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
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
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
    finally:
        if tmp is not None:
            tmp.cleanup()
    if results is None:  # non-zero ranks in distributed runs
        return {}
    results = _jsonable(dict(results))
    results["llmprune"] = {
        "data_dir": str(resolved_data) if resolved_data else None,
        "offline_tasks": [n for n in names if n in offline],
        "include_path": [p for p in includes if not (tmp and p.startswith(tmp.name))],
    }
    return results


def _task_manager(cls, includes: list[str], names: list[str]):
    """Index only the include dirs when they define every requested task (indexing lm-eval's few thousand
    built-in YAMLs takes seconds to minutes); otherwise the built-ins too (include dirs take precedence)."""
    if includes:
        manager = cls(include_path=includes, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            return manager
    return cls(include_path=includes or None)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return str(obj)


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
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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


def result_key(name: str, runtime: dict | None = None) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted((runtime or {}).items()) if v is not None)
    return f"{name}[{opts}]" if opts else name


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- results with the checkpoint


def is_checkpoint_dir(model_ref: str | os.PathLike | None) -> bool:
    """True for a directory written by llmprune (``config.json`` and ``llmprune.json``): results go there."""
    if model_ref is None or not Path(model_ref).is_dir():
        return False
    return (Path(model_ref) / "config.json").is_file() and (Path(model_ref) / "llmprune.json").is_file()


def read_results(directory: str | os.PathLike) -> dict:
    path = Path(directory) / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LlmpruneError(f"{path} is not valid JSON: {exc}") from None


def record_results(directory: str | os.PathLike, section: str, entries: dict[str, Any],
                   *, baseline: bool = False) -> Path:
    """Merge ``entries`` into ``eval_results.json[section]`` (or ``[baseline][section]``) by key.

    Sections used by llmprune: ``lm_eval`` (key: task), ``ppl`` (key: dataset and protocol), ``bench``.
    The file is rewritten atomically.
    """
    path = Path(directory) / RESULTS_FILE
    data = read_results(directory)
    target = data.setdefault("baseline", {}) if baseline else data
    target.setdefault(section, {}).update(_jsonable(entries))
    tmp = path.with_name(f".{RESULTS_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def ppl_entry(res: dict, *, model: str, data_path: str | None) -> dict[str, dict]:
    """``eval_results.json`` ``ppl`` entry for a :func:`llmprune.perplexity` result dict."""
    key = f"wikitext2[seqlen={res.get('seqlen')},windows={res.get('windows')}]"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {key: {"dataset": "wikitext2", **res, "data_path": data_path, "model": model, "date": date}}


def record_ppl(model_ref: str | None, res: dict, data_path: str | None, *, baseline_of: str | None = None) -> Path | None:
    """Store a ``llmprune ppl`` result with the checkpoint when ``model_ref`` is a checkpoint directory.

    With ``baseline_of=DIR`` the result is stored as the dense baseline of checkpoint ``DIR`` instead.
    """
    entry = ppl_entry(res, model=str(model_ref or "smollm2-135m"), data_path=data_path)
    if baseline_of is not None:
        if not is_checkpoint_dir(baseline_of):
            raise ConfigError(f"--baseline-of {baseline_of} is not a checkpoint directory")
        return record_results(baseline_of, "ppl", entry, baseline=True)
    if not is_checkpoint_dir(model_ref):
        return None
    return record_results(model_ref, "ppl", entry)
