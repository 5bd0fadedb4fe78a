"""Model card (``README.md``) for an llmprune checkpoint.

Built from the checkpoint's ``llmprune.json`` (recipe, calibration, command, achieved sparsity) and
``eval_results.json`` (perplexity, lm-eval and bench numbers, with the dense baseline stored by
``llmprune eval --baseline`` / ``llmprune bench``).

Privacy: the card names no local path. Absolute and home-relative paths (the base model directory, the
recorded command line, a calibration file, a gates directory) are shown relative to the checkpoint's parent
directory when they lie under it, else as a Hub id (when the folder records one) or by their last component
(:func:`public_path`, :func:`public_text`); paths already recorded relative are kept. The same rewrite is
applied to the JSON files :func:`llmprune.publish.hub.push` uploads (:func:`public_json`).

``library_name``: ``transformers`` for the ``dense`` format (the folder loads with
``AutoModelForCausalLM.from_pretrained`` alone, which is what the Hub's "Use this model" snippet shows);
``llmprune`` for other formats (packed 2:4 ...), which need ``import llmprune`` / ``llmprune.load``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from llmprune.config import RuntimeConfig
from llmprune.errors import LlmpruneError
from llmprune.evaluate.lm_eval import MAIN_METRIC
from llmprune.evaluate.results import read_results
from llmprune.formats.checkpoint import read_metadata

CARD_FILE = "README.md"
# Local aliases -> the Hub id of the model they stand for (for base_model metadata).
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_PAPERS = {
    "wanda": "[Wanda](https://arxiv.org/abs/2306.11695)",
    "sparsegpt": "[SparseGPT](https://arxiv.org/abs/2301.00774)",
    "magnitude": "magnitude pruning",
}


def _local_path(ref: str, directory: Path | None) -> Path | None:
    """``ref`` as an existing local path (relative ones: to the checkpoint, then to the cwd), or None."""
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [*([directory / path] if directory else []), path]
    return next((c for c in candidates if c.exists()), None)


def _recorded_hub_id(path: Path | None) -> str | None:
    """The Hub id a local model folder records as its origin (``config.json`` ``_name_or_path``), or None."""
    cfg = path / "config.json" if path is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text(encoding="utf-8")).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def hub_base_model(base: str | None, directory: Path | None = None) -> str | None:
    """A Hub id for ``base_model`` metadata, or None (local paths without a known origin)."""
    if not base or not isinstance(base, str):
        return None
    if base.lower() in HUB_IDS:
        return HUB_IDS[base.lower()]
    local = _local_path(base, Path(directory) if directory is not None else None)
    if local is not None or base.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:[\\/]", base):
        return _recorded_hub_id(local)
    return base if base.count("/") == 1 else None


# An absolute POSIX path, a home-relative one or a Windows drive path, quoted by shlex or bare; not part of
# a URL (``https://...``), a Hub id (``user/name``) or a ratio (``2/4``).
_QUOTED_PATH = re.compile(r"'((?:~|[A-Za-z]:)?[/\\][^']*)'")
_BARE_PATH = re.compile(r"(?<![\w.:/~\\-])((?:~|[A-Za-z]:)?[/\\][^\s'\"]*)")
# A path recorded relative to the checkpoint that climbs two or more levels (``../../home/me/x``).
_CLIMBING_PATH = re.compile(r"(?<![\w.:/~\\-])((?:\.\.[/\\]){2,}[^\s'\"]*)")


def public_path(ref: str, directory: str | os.PathLike | None = None) -> str:
    """A local path as the card shows it: under the checkpoint's parent directory, relative to that parent
    (``ckpt``, ``tiny-llama``); elsewhere the Hub id its ``config.json`` records, else its last component."""
    path = Path(ref).expanduser()
    if directory is not None:
        root = Path(directory).expanduser().resolve().parent
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            resolved = path
        if root != Path(root.anchor) and (resolved == root or root in resolved.parents):
            return os.path.relpath(resolved, root)
    return _recorded_hub_id(path) or re.split(r"[\\/]", str(ref).rstrip("/\\"))[-1] or "."


def public_text(text: str, directory: str | os.PathLike | None = None) -> str:
    """``text`` (a command line, a path, any string) with every absolute or ``~`` path, and every relative one
    that climbs two or more levels above the checkpoint (``../../x``), rewritten by :func:`public_path`; other
    relative paths, URLs and Hub ids are left as they are."""
    if not isinstance(text, str) or not any(c in text for c in "/\\"):
        return text

    def quoted(m: re.Match) -> str:
        return shlex.quote(public_path(m.group(1), directory))

    def bare(m: re.Match) -> str:
        return public_path(m.group(1), directory) if len(m.group(1)) > 1 else m.group(1)

    def climbing(m: re.Match) -> str:
        if directory is None:
            return Path(m.group(1)).name or m.group(1)
        return public_path(str(Path(directory).expanduser() / m.group(1)), directory)

    return _CLIMBING_PATH.sub(climbing, _BARE_PATH.sub(bare, _QUOTED_PATH.sub(quoted, text)))


def public_json(obj: Any, directory: str | os.PathLike | None = None) -> Any:
    """A JSON value with :func:`public_text` applied to every string (keys included)."""
    if isinstance(obj, dict):
        return {public_text(k, directory) if isinstance(k, str) else k: public_json(v, directory)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [public_json(v, directory) for v in obj]
    return public_text(obj, directory) if isinstance(obj, str) else obj


def _sparsity_tags(recipe: dict) -> list[str]:
    tags = []
    for stage in recipe.get("prune", []):
        sp = str(stage.get("sparsity", ""))
        if ":" in sp:
            tags += [sp, "semi-structured-sparsity"]
        elif sp:
            tags.append("unstructured-sparsity")
        if stage.get("method"):
            tags.append(stage["method"])
    return tags


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _delta(a, b, digits: int = 4) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "—"
    return f"{a - b:+.{digits}f}"


def _ppl_section(res: dict, base: dict) -> list[str]:
    rows = res.get("ppl", {})
    if not rows:
        return []
    out = ["### Perplexity", "", "| data | protocol | this model | dense baseline | Δ |", "|---|---|---:|---:|---:|"]
    for key, e in sorted(rows.items()):
        b = base.get("ppl", {}).get(key, {})
        proto = f"{e.get('windows')} × {e.get('seqlen')}-token windows"
        out.append(f"| {e.get('dataset', key)} | {proto} | {_fmt(e.get('ppl'), 3)} | {_fmt(b.get('ppl'), 3)} | "
                   f"{_delta(e.get('ppl'), b.get('ppl'), 3)} |")
    return out + [""]


def _lm_eval_section(res: dict, base: dict) -> list[str]:
    rows = res.get("lm_eval", {})
    if not rows:
        return []
    out = ["### lm-eval", "", "| task | metric | n | this model | dense baseline | Δ |", "|---|---|---:|---:|---:|---:|"]
    notes = set()
    for key, e in sorted(rows.items()):
        b = base.get("lm_eval", {}).get(e.get("task", key), {})
        metric = e.get("main_metric") or MAIN_METRIC.get(e.get("task", key)) or next(iter(e.get("metrics", {})), None)
        m, bm = e.get("metrics", {}).get(metric), b.get("metrics", {}).get(metric)
        if b and b.get("limit") != e.get("limit"):
            notes.add("baseline and model were evaluated with different --limit")
        if e.get("offline_data"):
            notes.add("offline task copies (llmprune/tasks, same prompts and metrics as lm-eval's)")
        out.append(f"| {key} | {metric} | {_fmt(e.get('n_samples'))} | {_fmt(m)} | {_fmt(bm)} | {_delta(m, bm)} |")
    limits = sorted({str(e.get("limit")) for e in rows.values()})
    out += ["", f"Zero-shot unless noted; `--limit` {', '.join(limits)} (None = full set)."]
    out += [f"Note: {n}." for n in sorted(notes)]
    return out + [""]


_BENCH_LABEL = {"model": "this model", "baseline": "dense baseline"}


def _bench_section(res: dict) -> list[str]:
    bench = res.get("bench")
    if not bench:
        return []
    rows = bench.get("rows", [])
    out = ["### Speed and memory (`llmprune bench`)", ""]
    if bench.get("device"):
        out.append(f"Device: {bench['device']}{' (CPU: torch reference paths, not kernels)' if bench.get('cpu') else ''}; "
                   f"prompt {bench.get('prompt_len')} tokens, {bench.get('new_tokens')} decoded tokens.")
        out.append("")
    out += ["| model | features | checkpoint MiB | batch | peak mem MiB | prefill tok/s | decode tok/s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {_BENCH_LABEL.get(r.get('label'), r.get('label'))} | {', '.join(r.get('features') or []) or 'dense'} | "
            f"{_fmt((r.get('checkpoint_bytes') or 0) / 2**20 if r.get('checkpoint_bytes') else None, 1)} | "
            f"{r.get('batch')} | {_fmt(r.get('peak_mem_bytes') / 2**20 if r.get('peak_mem_bytes') else None, 1)} | "
            f"{_fmt(r.get('prefill_tok_s'), 1)} | {_fmt(r.get('decode_tok_s'), 1)} |"
        )
    return out + [""]


def baseline_measured(res: dict) -> list[str]:
    """Sections of ``eval_results.json`` whose rows have a dense-baseline number beside them (``perplexity``,
    ``lm-eval``, ``bench``): the card's baseline sentence names these and appears only when there is one."""
    base = res.get("baseline") or {}
    out = []
    ppl = res.get("ppl") or {}
    if any(isinstance(b, dict) and b.get("ppl") is not None for k, b in (base.get("ppl") or {}).items() if k in ppl):
        out.append("perplexity")
    tasks = {e.get("task", k) for k, e in (res.get("lm_eval") or {}).items() if isinstance(e, dict)}
    if any(isinstance(b, dict) and b.get("metrics") for k, b in (base.get("lm_eval") or {}).items() if k in tasks):
        out.append("lm-eval")
    rows = (res.get("bench") or {}).get("rows") or []
    if any(isinstance(r, dict) and r.get("label") == "baseline" for r in rows):
        out.append("bench")
    return out


def build_card(directory: str | os.PathLike, *, repo_id: str | None = None) -> str:
    """Model card text for checkpoint ``directory``."""
    directory = Path(directory)
    meta = read_metadata(directory)
    if meta is None:
        raise LlmpruneError(f"{directory} is not an llmprune checkpoint (no llmprune.json)")
    hub_base = hub_base_model(meta.get("base_model"), directory)  # from the raw path: it reads the folder
    meta = public_json(meta, directory)
    res = public_json(read_results(directory), directory)
    base_res = res.get("baseline") or {}
    recipe = meta.get("recipe") or {}
    fmt = meta.get("format", "dense")
    base = hub_base or meta.get("base_model")
    stages = recipe.get("prune", [])
    tags = ["llmprune", "pruned", "sparsity", *_sparsity_tags(recipe)]
    if fmt != "dense":
        tags.append(f"{fmt}-format")
    runtime = recipe.get("runtime") or {}
    tags += [f"runtime-{k.replace('_', '-')}" for k in runtime]
    front = {
        **({"base_model": hub_base} if hub_base else {}),
        "library_name": "transformers" if fmt == "dense" else "llmprune",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tags)),
    }
    name = repo_id or directory.resolve().name
    overall = (meta.get("sparsity") or {}).get("overall")
    desc = " then ".join(f"{_PAPERS.get(s.get('method'), s.get('method'))} at sparsity {s.get('sparsity')}"
                         for s in stages) or "llmprune"
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", ""]
    lines.append(
        f"`{base}` pruned with {desc}"
        + (f" ({overall:.2%} of the prunable linear weights are zero)" if isinstance(overall, float) else "")
        + f", saved by [llmprune](https://pypi.org/project/llmprune/) {meta.get('llmprune_version', '')} "
        f"in the `{fmt}` checkpoint format."
    )
    lines.append("")
    lines += ["## Use", "", "```python"]
    if fmt == "dense":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained({name!r})",
                  f"tok = AutoTokenizer.from_pretrained({name!r})"]
    else:
        lines += ["import llmprune  # pip install llmprune",
                  f"model = llmprune.load({name!r})  # {fmt} format: llmprune's loader",
                  f"tok = llmprune.load_tokenizer({name!r})"]
    lines += ["```", ""]
    if runtime:
        flags = {f.name: f.metadata["flag"] for f in dataclasses.fields(RuntimeConfig)}
        lines += ["Recorded runtime options (`llmprune generate`, `ppl`, `eval` and `bench` apply them; flags "
                  "override them): " + ", ".join(f"`{flags.get(k, k)} {v}`" for k, v in runtime.items()), ""]
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    lines += ["## Reproduce", "", "```bash", meta.get("command") or "(command not recorded)", "```", ""]
    cal = meta.get("calibration")
    lines += ["## Calibration", ""]
    if cal:
        lines.append(
            f"{cal.get('nsamples')} sequences × {cal.get('seqlen')} tokens from `{cal.get('source')}`"
            + (f" (config {cal['dataset_config']})" if cal.get("dataset_config") else "")
            + f", seed {cal.get('seed')}: documents shuffled with the seed, tokenized, joined with EOS into one "
            "stream; windows start at seeded random offsets. Pruning runs layer by layer, each layer calibrated on "
            "the outputs of the already-pruned layers before it."
        )
    else:
        lines.append("No calibration data (data-free method).")
    lines.append("")
    lines += ["## Results", ""]
    body = _ppl_section(res, base_res) + _lm_eval_section(res, base_res) + _bench_section(res)
    if body:
        lines += body
        measured = baseline_measured(res)
        who = f"`{base}`" if base else "the base model"
        if measured:
            lines.append(f"Dense baseline ({', '.join(measured)}): {who}, evaluated with the same protocol and settings.")
        else:
            lines.append("No dense baseline was measured for these numbers (`llmprune eval DIR --baseline`, "
                         "`llmprune ppl BASE --baseline-of DIR` and `llmprune bench DIR` measure one).")
    else:
        lines.append("Not measured yet: run `llmprune ppl DIR`, `llmprune eval DIR --baseline`, `llmprune bench DIR`.")
    lines.append("")
    modules = (meta.get("sparsity") or {}).get("modules") or {}
    if modules:
        lines += ["## Sparsity", "", f"{len(modules)} linear modules pruned; `lm_head` and embeddings are dense. "
                  "Per-module sparsity is in `llmprune.json`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_card(directory: str | os.PathLike, *, repo_id: str | None = None, text: str | None = None) -> Path:
    """(Re)write ``directory/README.md`` (``text``: an already built card), atomically."""
    path = Path(directory) / CARD_FILE
    text = build_card(directory, repo_id=repo_id) if text is None else text
    tmp = path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
