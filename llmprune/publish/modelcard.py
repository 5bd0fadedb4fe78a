"""Model card (``README.md``) for an llmprune checkpoint.

Built from the checkpoint's ``llmprune.json`` (recipe, calibration, command, achieved sparsity) and
``eval_results.json`` (perplexity, lm-eval and bench numbers, with the dense baseline stored by
``llmprune eval --baseline`` / ``llmprune bench``).

Privacy: the card names no local path; what it shows of one (and the Hub id of the base model) comes from
:mod:`llmprune.publish.paths`, which applies the same rewrite to the JSON files
:func:`llmprune.publish.hub.push` uploads.

``library_name``: ``transformers`` for the ``dense`` format (the folder loads with
``AutoModelForCausalLM.from_pretrained`` alone, which is what the Hub's "Use this model" snippet shows);
``llmprune`` for other formats (packed 2:4 ...), which need ``import llmprune`` / ``llmprune.load``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from llmprune.config import RuntimeConfig
from llmprune.errors import LlmpruneError
from llmprune.evaluate.lm_eval import MAIN_METRIC
from llmprune.evaluate.results import read_results
from llmprune.formats.checkpoint import read_metadata
from llmprune.publish.paths import hub_base_model, public_json

CARD_FILE = "README.md"
_PAPERS = {
    "wanda": "[Wanda](https://arxiv.org/abs/2306.11695)",
    "sparsegpt": "[SparseGPT](https://arxiv.org/abs/2301.00774)",
    "magnitude": "magnitude pruning",
}


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
