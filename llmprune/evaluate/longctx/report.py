"""Long-context results: accuracy per task and length, side-by-side tables, ``eval_results.json`` entries and the
model card's section (section ``longctx``, key ``task@context`` with the runtime options appended)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmprune.evaluate.results import result_key, utc_now

if TYPE_CHECKING:  # runner imports torch; the model card reads this module without it
    from llmprune.evaluate.longctx.runner import SampleResult

SECTION = "longctx"


def runtime_label(runtime: Mapping[str, Any] | None) -> str:
    """``"dense"`` or the options, e.g. ``"kv_sparsity=0.7"``, ``"attn_sparsity=0.9"`` (the gates path left out)."""
    opts = [f"{k}={v}" for k, v in sorted((runtime or {}).items()) if v is not None and k != "gates"]
    return ",".join(opts) or ("gates" if (runtime or {}).get("gates") else "dense")


def summarize(results: Sequence[SampleResult]) -> list[dict[str, Any]]:
    """One row per (task, context): ``accuracy`` (mean score x 100), ``n``, mean prompt tokens and cache bytes."""
    groups: dict[tuple[str, int], list[SampleResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.context), []).append(r)
    rows = []
    for (task, context), rs in groups.items():
        n = len(rs)
        rows.append({
            "task": task, "context": context, "n": n,
            "accuracy": 100 * sum(r.score for r in rs) / n,
            "prompt_tokens": sum(r.n_tokens for r in rs) / n,
            "new_tokens": sum(r.new_tokens for r in rs) / n,
            "kv_bytes": sum(r.kv_bytes for r in rs) / n,
            "kv_dense_bytes": sum(r.kv_dense_bytes for r in rs) / n,
        })
    return rows


def entries(rows: Sequence[Mapping[str, Any]], *, model: str, runtime: Mapping[str, Any] | None,
            settings: Mapping[str, Any]) -> dict[str, dict]:
    """``eval_results.json`` entries for the rows of one runtime setting (``settings``: seed, haystack, chat)."""
    date = utc_now()
    out = {}
    for row in rows:
        key = result_key(f"{row['task']}@{row['context']}", dict(runtime or {}))
        out[key] = {**row, "metric": "string_match_all", "runtime": dict(runtime or {}), "model": model,
                    **dict(settings), "date": date}
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def format_table(summaries: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown: accuracy per task and length, one column per setting, a mean row per length, then cache MiB."""
    labels = list(summaries)
    cells: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for label, rows in summaries.items():
        for row in rows:
            cells.setdefault((row["task"], row["context"]), {})[label] = row
    lines = ["| task | context | n | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    contexts = sorted({c for _, c in cells})
    for context in contexts:
        keys = [k for k in cells if k[1] == context]
        for task, c in keys:
            row = cells[(task, c)]
            n = "/".join(sorted({str(r["n"]) for r in row.values()}))
            lines.append(f"| {task} | {c} | {n} | " + " | ".join(
                f"{row[lab]['accuracy']:.1f}" if lab in row else "-" for lab in labels) + " |")
        means = []
        for lab in labels:
            accs = [cells[k][lab]["accuracy"] for k in keys if lab in cells[k]]
            means.append(f"**{sum(accs) / len(accs):.1f}**" if accs else "-")
        lines.append(f"| **mean** | {context} | | " + " | ".join(means) + " |")
    lines += ["", "KV cache at the end of generation, MiB (mean over samples; dense = the same tokens uncompressed):",
              "", "| context | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for context in contexts:
        vals = []
        for lab in labels:
            rows = [cells[k][lab] for k in cells if k[1] == context and lab in cells[k]]
            stored = sum(r["kv_bytes"] for r in rows) / max(1, len(rows))
            dense = sum(r["kv_dense_bytes"] for r in rows) / max(1, len(rows))
            vals.append(f"{_mib(stored)} of {_mib(dense)}" if rows else "-")
        lines.append(f"| {context} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def card_section(res: Mapping[str, Any]) -> list[str]:
    """The model card's long-context table from ``eval_results.json`` (empty when nothing was measured)."""
    stored = res.get(SECTION) or {}
    base = (res.get("baseline") or {}).get(SECTION) or {}
    summaries: dict[str, list[Mapping[str, Any]]] = {}
    for e in base.values():
        if isinstance(e, dict) and "accuracy" in e:
            summaries.setdefault("base model " + runtime_label(e.get("runtime")), []).append(e)
    for e in stored.values():
        if isinstance(e, dict) and "accuracy" in e:
            summaries.setdefault(runtime_label(e.get("runtime")), []).append(e)
    if not summaries:
        return []
    return ["### Long context (`llmprune eval --tasks niah_single,... --context N`)", "",
            "RULER-style synthetic tasks, answers generated greedily with the runtime options active in decode; "
            "accuracy = mean string_match_all x 100.", "", format_table(summaries), ""]
