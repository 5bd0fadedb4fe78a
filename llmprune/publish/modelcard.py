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

from llmprune.config import RuntimeConfig
from llmprune.errors import LlmpruneError
from llmprune.evaluate.inspect import inspect_checkpoint
from llmprune.evaluate.lm_eval import MAIN_METRIC
from llmprune.evaluate.longctx.report import card_section as longctx_card_section
from llmprune.evaluate.results import read_results
from llmprune.formats.checkpoint import read_metadata
from llmprune.formats.reading import read_json
from llmprune.publish.card_meta import (
    RECIPE_FILE,
    atomic_write,
    base_card_data,
    calib_dataset,
    eval_results,
    recipe_yaml,
    recovery,
)
from llmprune.publish.paths import hub_base_model, public_json, public_text

CARD_FILE = "README.md"
_PAPERS = {
    "wanda": "[Wanda](https://arxiv.org/abs/2306.11695)",
    "sparsegpt": "[SparseGPT](https://arxiv.org/abs/2301.00774)",
    "magnitude": "magnitude pruning",
    "cfsp": "[CFSP](https://arxiv.org/abs/2409.13199) structured pruning",
    "slicegpt": "[SliceGPT](https://arxiv.org/abs/2401.15024) slicing of the hidden dimension",
}
#: Methods that remove whole channels (the model gets smaller) instead of zeroing weights.
_STRUCTURED_METHODS = {"cfsp", "slicegpt"}


def _sliced_lines(directory: Path) -> list[str]:
    """What SliceGPT sliced (from ``config.json``); nothing for other checkpoints."""
    cfg = read_json(directory / "config.json", what="config.json") or {}
    k, d = cfg.get("llmprune_sliced_dim"), cfg.get("hidden_size")
    if not isinstance(k, int) or not isinstance(d, int):
        return []
    tied = ("embeddings tied to `lm_head`, the final norm ending in a k x k map" if cfg.get("llmprune_sliced_head_proj")
            else "`lm_head` has its own table")
    shortcuts = (f"two {k} x {k} residual-shortcut matrices (attention and MLP skips)"
                 if any(cfg.get("llmprune_sliced_attn_shortcuts") or []) else f"a {k} x {k} residual-shortcut matrix")
    return [f"Sliced by SliceGPT: the residual stream (embedding dimension) is {k} of the base model's {d} "
            f"({1 - k / d:.1%} removed) in every layer, rotated to the principal components of the calibration "
            f"activations; embeddings and `lm_head` are rotated and sliced in width, never in vocabulary "
            f"({tied}); each layer has {shortcuts}. Model type "
            f"`{cfg.get('model_type')}`: run `import llmprune` before `AutoModelForCausalLM.from_pretrained`.", ""]


def _sparsity_tags(recipe: dict) -> list[str]:
    tags = []
    for stage in recipe.get("prune", []):
        sp = str(stage.get("sparsity", ""))
        if stage.get("method") in _STRUCTURED_METHODS:
            tags += ["structured-pruning", "structured-sparsity"]
        elif ":" in sp:
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
    out = ["### lm-eval", "", "| task | metric | n | this model | dense baseline | Δ | recovery |",
           "|---|---|---:|---:|---:|---:|---:|"]
    notes = set()
    for key, e in sorted(rows.items()):
        b = base.get("lm_eval", {}).get(e.get("task", key), {})
        metric = e.get("main_metric") or MAIN_METRIC.get(e.get("task", key)) or next(iter(e.get("metrics", {})), None)
        m, bm = e.get("metrics", {}).get(metric), b.get("metrics", {}).get(metric)
        if b and b.get("limit") != e.get("limit"):
            notes.add("baseline and model were evaluated with different --limit")
        if e.get("offline_data"):
            notes.add("offline task copies (llmprune/tasks, same prompts and metrics as lm-eval's)")
        out.append(f"| {key} | {metric} | {_fmt(e.get('n_samples'))} | {_fmt(m)} | {_fmt(bm)} | {_delta(m, bm)} | "
                   f"{recovery(m, bm)} |")
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
    name = repo_id or directory.resolve().name
    license_, language = base_card_data(hub_base, directory)
    cal = meta.get("calibration") or {}
    dataset = calib_dataset(cal.get("source"))
    facts = inspect_checkpoint(directory, sparsity=False)
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=hub_base, library_name="transformers" if fmt == "dense" else "llmprune",
        pipeline_tag="text-generation", tags=list(dict.fromkeys(tags)), license=license_, language=language,
        datasets=[dataset] if dataset else None, model_name=name, eval_results=eval_results(res, name) or None,
        parameters=facts["parameters"], dtype=facts["dtype"],
    )
    overall = (meta.get("sparsity") or {}).get("overall")
    desc = " then ".join(f"{_PAPERS.get(s.get('method'), s.get('method'))} at sparsity {s.get('sparsity')}"
                         for s in stages) or "llmprune"
    structured = any(s.get("method") in _STRUCTURED_METHODS for s in stages)
    what = "of the prunable parameters (FFN channels / attention head groups) removed" if structured else \
        "of the prunable linear weights are zero"
    if any(s.get("method") == "slicegpt" for s in stages):
        what = "of the decoder layers' linear weights removed"
    lines = ["---", data.to_yaml().strip(), "---", "", f"# {name}", ""]
    lines.append(
        f"`{base}` pruned with {desc}"
        + (f" ({overall:.2%} {what})" if isinstance(overall, float) else "")
        + f", saved by [llmprune](https://pypi.org/project/llmprune/) {meta.get('llmprune_version', '')} "
        f"in the `{fmt}` checkpoint format."
        + (f" Converted from the `{meta['converted_from']}` format with `llmprune convert`."
           if meta.get("converted_from") and meta["converted_from"] != fmt else "")
    )
    lines.append("")
    lines.append(f"{facts['parameters']:,} parameters, {facts['dtype']}, {facts['bytes']['weights'] / 2**20:.1f} MiB "
                 "of weight files." + (" Structurally pruned: fewer parameters than the base model." if structured
                                        else ""))
    lines.append("")
    lines += _sliced_lines(directory)
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
    lines += ["## Recipe", "", "Also saved as `recipe.yaml` (`llmprune compress --recipe recipe.yaml`).", "",
              "```yaml", recipe_yaml(meta).strip(), "```", ""]
    commands = [meta.get("command") or "(command not recorded)"] + (
        [meta["convert_command"]] if meta.get("convert_command") else [])
    lines += ["## Reproduce", "", "Local paths are relative to this checkpoint's directory.", "", "```bash",
              *commands, "```", ""]
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
    body = (_ppl_section(res, base_res) + _lm_eval_section(res, base_res) + longctx_card_section(res)
            + _bench_section(res))
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
    lines += _recovery_section(meta.get("recovery") or {})
    return "\n".join(lines).rstrip() + "\n"


def _recovery_section(rec: dict) -> list[str]:
    """Recovery that kept the pattern (``llmprune.json`` ``recovery``): per-block losses before/after."""
    if not rec:
        return []
    out = ["## Recovery", "", "The sparsity pattern was kept (pruned weights stay zero; checked before saving)."]
    if rec.get("e2e"):
        e = rec["e2e"]
        on = f" on {e['sequences']} sequences" if e.get("sequences") else ""
        out += ["", f"End-to-end distillation from the dense model: {e.get('steps')} steps{on}, loss "
                f"{_fmt(e.get('loss_before'))} → {_fmt(e.get('loss_after'))}."]
    blocks = rec.get("blocks") or []
    if blocks:
        out += ["", "Block-wise reconstruction against the dense block outputs (mean squared error):", "",
                "| layer | part | steps | loss before | loss after |", "|---:|---|---:|---:|---:|"]
        for b in blocks:
            for part, r in b.items():
                if part != "layer":
                    out.append(f"| {b['layer']} | {part} | {r.get('steps')} | {r.get('loss_before', 0):.4g} | "
                               f"{r.get('loss_after', 0):.4g} |")
    return out + [""]


def write_card(directory: str | os.PathLike, *, repo_id: str | None = None, text: str | None = None) -> Path:
    """(Re)write ``directory/README.md`` (``text``: an already built card) and ``recipe.yaml``, atomically."""
    path = Path(directory) / CARD_FILE
    text = build_card(directory, repo_id=repo_id) if text is None else text
    atomic_write(path, text)
    meta = read_metadata(directory)
    if meta is not None:
        atomic_write(Path(directory) / RECIPE_FILE, public_text(recipe_yaml(meta), directory))
    return path
