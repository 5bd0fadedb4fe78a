"""Entropy-guided (UNComp-style), sensitivity (greedy) and uniform KV budgets: WikiText-2 perplexity of SmolLM2-135M.

Protocol:
  * entropy scores: `llmprune.calibration.entropy.kv_entropy_scores` on --nsamples x --calib-seqlen tokens of C4
    (../shared/data/c4/c4_validation_2k.parquet), one decoder layer at a time; keys = k_proj outputs (pre-RoPE),
    values = v_proj outputs; allocation `llmprune.runtime.kvcache.budgets.make_budgets` (integer keep counts per
    layer and KV head whose totals equal the uniform ones exactly);
  * sensitivity: `llmprune.calibration.kv_sensitivity.kv_sensitivity` (KL of pruning one layer's K or V alone at
    --sens-keeps, --sens-nsamples x 512 C4 tokens, or sequences A..B-1 with --sens-samples A:B; cached in
    <out>.sensitivity.json, or merged by `merge_sensitivity_parts` from the --sens-parts files of runs split by
    layer, keep count or sequences), allocation `llmprune.runtime.kvcache.greedy.sensitivity_budgets`
    (variants `sens:joint` / `sens:separate`);
  * WikiText-2 raw test joined with "\\n\\n", non-overlapping --seqlen windows (default 512), the first --windows
    (default 20) after skipping --window-offset windows (held-out windows); every KV row uses
    `perplexity_with_cache` (fresh cache per window, chunks of --kv-window tokens = the token-by-token decode cache
    state), torch path, fp32 on CPU; with --path emulate instead the one-pass
    emulation of that cache (`llmprune.calibration.kv_emulate`, same attention, ~4x cheaper; tested equal to the
    chunked cache); the row records which;
  * bytes: stored / dense cache bytes at the end of a window, counted for a 16-bit cache (emulated rows: a real
    BitmapKVCache with the same allocation fed one window of random K/V, the bytes do not depend on values).

Rows are appended to <out>.rows.jsonl as they finish, so a run can be split (--only) and resumed.

Usage:
    python eval/kv_budgets_table.py --windows 20 --sparsities 0.5,0.6,0.7,0.8 --out eval/results/kv_budgets.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import llmprune
from llmprune.calibration.data import load_calibration
from llmprune.calibration.entropy import kv_entropy_scores
from llmprune.calibration.kv_emulate import emulated_kv_cache
from llmprune.calibration.kv_sensitivity import kv_sensitivity, merge_sensitivity_parts
from llmprune.config import CalibConfig
from llmprune.evaluate.perplexity import perplexity, perplexity_with_cache, token_stream, wikitext2_text
from llmprune.runtime.kvcache import BitmapKVCache
from llmprune.runtime.kvcache.budgets import KVBudgets, make_budgets
from llmprune.runtime.kvcache.greedy import sensitivity_budgets


def scores(args, model, tok) -> dict:
    path = Path(args.out).with_suffix(".scores.json")
    if path.exists():
        return json.loads(path.read_text())
    cal = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0, batch_size=4)
    t0 = time.perf_counter()
    ids = load_calibration(cal, tok, model)
    ent = kv_entropy_scores(model, ids, torch.device("cpu"), batch_size=4)
    data = {**ent.to_dict(), "seconds": time.perf_counter() - t0, "calib": vars(cal)}
    path.write_text(json.dumps(data) + "\n")
    return data


def sensitivity(args, model, tok) -> dict:
    path = Path(args.out).with_suffix(".sensitivity.json")
    if path.exists():
        return json.loads(path.read_text())
    if args.sens_parts:  # split runs (by layer, keep count or sequences): merged by merge_sensitivity_parts
        parts = [json.loads(Path(p).read_text()) for p in args.sens_parts.split(",")]
        data = merge_sensitivity_parts(parts)
        data["parts"] = args.sens_parts
        data["calib"] = {**parts[0].get("calib", {}), "nsamples": data["tokens"] // 512}
    else:
        a, b = (int(x) for x in args.sens_samples.split(":")) if args.sens_samples else (0, args.sens_nsamples)
        cal = CalibConfig(source=args.calib, nsamples=b, seqlen=512, seed=0, batch_size=1)
        ids = load_calibration(cal, tok, model)[a:b]  # the first sequences do not depend on nsamples
        only = [int(i) for i in args.sens_layers.split(",")] if args.sens_layers else None
        keeps = [int(k) for k in args.sens_keeps.split(",")]
        sens = kv_sensitivity(model, ids, torch.device("cpu"), keeps=keeps, window=args.kv_window, only=only,
                              batch_size=args.sens_batch)
        data = {**sens.to_dict(), "calib": vars(cal), "samples": f"{a}:{b}"}
        if only is not None or args.sens_samples:  # one part of a split run: merge the parts with --sens-parts
            layers = "all" if only is None else f"{only[0]}-{only[-1]}"
            tag = f"-s{a}-{b}-k{'_'.join(map(str, keeps))}" if args.sens_samples else ""
            path = path.with_suffix(f".part-{layers}{tag}.json")
            path.write_text(json.dumps(data) + "\n")
            sys.exit(f"wrote {path}; merge the parts with --sens-parts")
    path.write_text(json.dumps(data) + "\n")
    return data


def emulated(model, ids, args, b):
    """Perplexity through the one-pass emulation of the chunked pruned cache (same windows as `perplexity`)."""
    nll, n, t0 = 0.0, 0, time.perf_counter()
    with torch.no_grad(), emulated_kv_cache(model, args.kv_window) as emu:
        for i in range(b.layers):
            emu.set(i, b.k_keep[i], b.v_keep[i])
        for w in range(args.windows):
            x = ids[:, w * args.seqlen : (w + 1) * args.seqlen]
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
            n += x.shape[1] - 1
    return {"ppl": math.exp(nll / n), "seconds": time.perf_counter() - t0, "tokens": n,
            "ratio_16bit": layout_ratio(model.config, b, args)}


def layout_ratio(config, b, args) -> float:
    """16-bit stored / dense bytes of a real BitmapKVCache with allocation ``b`` after one window (random K/V:
    the bytes depend only on the layout and the keep counts)."""
    cache = BitmapKVCache(config, window=args.kv_window, backend="torch", allocation=b)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.seqlen // args.kv_window):
        for i in range(b.layers):
            kv = torch.randn(2, 1, b.heads, args.kv_window, b.head_dim, generator=g)
            cache.update(kv[0], kv[1], i)
    return cache.compression_ratio(element_size=2)


def entropy_budgets(st: dict, sc: dict):
    which = st.get("which", "kv")
    pre = "" if st.get("score", "matrix") == "matrix" else "_coord"
    return make_budgets(sc[f"k{pre}_entropy"] if "k" in which else None,
                        sc[f"v{pre}_entropy"] if "v" in which else None, sc["head_dim"], st["s"], st["s"],
                        allocation=st["allocation"], layers=len(sc["k_entropy"]), heads=len(sc["k_entropy"][0]),
                        **({"per": st["per"], "power": st["power"]} if st["allocation"] == "entropy" else {}))


def row_budgets(r: dict, sc: dict):
    """The allocation of a finished row (rebuilt for uniform / entropy rows, stored for sensitivity rows)."""
    if r["allocation"] == "sensitivity":
        return KVBudgets(64 if not sc else sc["head_dim"], r["k_keep"], r["v_keep"], r["k_mean"], r["v_mean"],
                         "sensitivity")
    return entropy_budgets(r, sc)


def settings(args) -> list[dict]:
    out = [{"name": "dense"}]
    for s in [float(x) for x in args.sparsities.split(",")]:
        out.append({"name": f"uniform {s:g}", "allocation": "uniform", "s": s})
        for variant in [v for v in args.sens_variants.split(",") if v]:
            out.append({"name": f"sensitivity {s:g} {variant}", "allocation": "sensitivity", "s": s,
                        "joint": variant.endswith("joint")})
        for variant in [v for v in args.variants.split(",") if v]:
            per, power, *rest = variant.split(":")
            which = rest[0] if rest else "kv"
            score = rest[1] if len(rest) > 1 else "matrix"
            out.append({"name": f"entropy {s:g} {variant}", "allocation": "entropy", "s": s, "per": per,
                        "power": float(power), "which": which, "score": score})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/wikitext2/wiki.test.raw.txt")
    ap.add_argument("--calib", default="../shared/data/c4/c4_validation_2k.parquet")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--window-offset", type=int, default=0,
                    help="skip this many WikiText-2 windows first (held-out windows)")
    ap.add_argument("--kv-window", type=int, default=32)
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--variants", default="head:1",
                    help="entropy mappings PER:POWER[:kv|k|v[:matrix|coord]] (k / v: only that one by entropy, the "
                         "other uniform; coord: coordinate entropy instead of matrix entropy)")
    ap.add_argument("--sens-variants", default="sens:joint", help="sensitivity rows: sens:joint and/or sens:separate")
    ap.add_argument("--sens-keeps", default="24,12,5", help="keep counts the sensitivity is measured at")
    ap.add_argument("--sens-nsamples", type=int, default=1, help="C4 sequences x 512 for the sensitivity")
    ap.add_argument("--sens-samples", default=None,
                    help="A:B: measure on C4 sequences A..B-1 (of B, seed 0) only and write a part, then exit")
    ap.add_argument("--sens-batch", type=int, default=1, help="sensitivity: sequences per forward pass")
    ap.add_argument("--sens-parts", default=None, help="merge these kv_sensitivity JSON parts (split runs)")
    ap.add_argument("--sens-layers", default=None, help="measure only these layers (a part of a split run), then exit")
    ap.add_argument("--path", default="cache", choices=("cache", "emulate"),
                    help="evaluate through the real chunked cache (default) or its one-pass emulation")
    ap.add_argument("--only", default=None, help="run only settings whose name contains this (split runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/results/kv_budgets.md")
    ap.add_argument("--write-only", action="store_true", help="only build the table from the rows file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_path = Path(args.out).with_suffix(".rows.jsonl")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[r["name"]] = r
    model = llmprune.load(args.model, dtype="float32", device="cpu")
    if not args.write_only:
        tok = llmprune.load_tokenizer(args.model)
        sc = scores(args, model, tok)
        sens = sensitivity(args, model, tok) if args.sens_variants else None
        ids = token_stream(tok, wikitext2_text(args.data))[:, args.window_offset * args.seqlen :]
        for st in settings(args):
            if st["name"] in done or (args.only and args.only not in st["name"]):
                continue
            t0 = time.perf_counter()
            if st["name"] == "dense":
                r = perplexity(model, ids, args.seqlen, args.windows, progress=False)
                row = {"name": "dense", "ppl": r.ppl, "seconds": r.seconds, "tokens": r.tokens}
            elif st["allocation"] == "sensitivity":
                b = sensitivity_budgets(sens["k_err"], sens["v_err"], sens["keeps"], sens["head_dim"], sens["heads"],
                                        st["s"], joint=st["joint"])
                if args.path == "emulate":
                    r = emulated(model, ids, args, b)
                else:
                    res = perplexity_with_cache(model, ids, args.seqlen, args.windows, k_sparsity=None,
                                                v_sparsity=None, window=args.kv_window, backend="torch",
                                                progress=False, allocation=b)
                    r = {"ppl": res.ppl, "seconds": res.seconds, "tokens": res.tokens, "ratio_16bit": res.bytes_ratio_16bit}
                row = {**st, **r, "path": args.path, "k_mean": b.mean_sparsity("k"), "v_mean": b.mean_sparsity("v"),
                       "k_keep": b.k_keep, "v_keep": b.v_keep,
                       "k_keep_range": [min(map(min, b.k_keep)), max(map(max, b.k_keep))],
                       "v_keep_range": [min(map(min, b.v_keep)), max(map(max, b.v_keep))]}
            else:
                b = entropy_budgets(st, sc)
                if args.path == "emulate":
                    r = emulated(model, ids, args, b)
                else:
                    res = perplexity_with_cache(model, ids, args.seqlen, args.windows, k_sparsity=st["s"],
                                                v_sparsity=st["s"], window=args.kv_window, backend="torch",
                                                progress=False, allocation=b)
                    r = {"ppl": res.ppl, "seconds": res.seconds, "tokens": res.tokens,
                         "ratio_16bit": res.bytes_ratio_16bit}
                row = {**st, **r, "path": args.path,
                       "k_mean": b.mean_sparsity("k"), "v_mean": b.mean_sparsity("v"),
                       "k_keep_range": [min(map(min, b.k_keep)), max(map(max, b.k_keep))],
                       "v_keep_range": [min(map(min, b.v_keep)), max(map(max, b.v_keep))]}
            row["wall"] = time.perf_counter() - t0
            print(json.dumps(row), flush=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[row["name"]] = row
    write(args, model, list(done.values()))


def write(args, model, rows) -> None:
    cfg = model.config
    dense = next((r for r in rows if r["name"] == "dense"), None)
    base = dense["ppl"] if dense else float("nan")
    sc_path = Path(args.out).with_suffix(".scores.json")
    sc = json.loads(sc_path.read_text()) if sc_path.exists() else {}
    lines = [
        "# KV budgets on SmolLM2-135M: uniform vs entropy-guided (UNComp-style) vs sensitivity (greedy)",
        "",
        f"Model `{args.model}` ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads, head_dim "
        f"{sc.get('head_dim', '?')}), fp32 on CPU ({platform.machine()}, {args.threads} threads), llmprune "
        f"{llmprune.__version__}, torch {torch.__version__}.",
        "",
        f"WikiText-2 test, **{args.windows} windows x {args.seqlen} tokens** from window {args.window_offset}"
        + (f" ({dense['tokens']} predicted tokens)" if dense else "")
        + f", mean NLL; pruned bitmap cache active (*eval* `cache`: `perplexity_with_cache`, dense window "
        f"{args.kv_window}, torch path; `emulate`: the one-pass emulation of exactly that cache, "
        "`llmprune.calibration.kv_emulate`)."
        f" Entropy scores from {args.nsamples} x {args.calib_seqlen} C4 calibration tokens (`{args.calib}`), keys "
        "pre-RoPE (k_proj outputs), values = v_proj outputs. Entropy mapping: keep_i = clip(c * (H_i / max H) ** power,"
        " keep(max_s), keep(min_s)), bounds [s - 0.3, s + 0.2] within [0, 0.95], K and V allocated separately; integer"
        " keep counts whose totals equal the uniform totals exactly, so the byte ratio is identical to uniform's"
        " (*bytes now*: recomputed for every row's allocation with the current bitmap layout when the table was"
        " written; *bytes at run*: what the run measured, with the layout of its day)."
        " Sensitivity: per layer, the KL of the next-token distribution from the dense model's when only that"
        " layer's K (or V) is pruned, measured at a few keep counts on C4 (see the sensitivity line below), made a"
        " convex table per keep count, greedy minimum of the summed KL under the exact total (`joint`: K and V share"
        " one K+V entry total, so their means move apart and their average is the uniform one; `separate`: K and V"
        " each at its uniform total); bounds keep [smallest measured keep, 64]."
        " *recovered* = share of the uniform allocation's perplexity increase over dense that the entropy allocation "
        "removes. Bytes counted for a 16-bit cache at the end of a window (incl. the 32-token dense window).",
        "",
        "| setting | eval | ppl | delta vs dense | recovered | K / V mean sparsity | K keep range | V keep range | "
        "bytes now / dense (16-bit) | bytes at run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    uni = {r["s"]: r for r in rows if r.get("allocation") == "uniform"}
    order = sorted(rows, key=lambda r: (r.get("s", -1), r.get("allocation") != "uniform", r["name"]))
    for r in order:
        if r["name"] == "dense":
            lines.append(f"| dense (no cache) | - | {r['ppl']:.3f} | +0.000 | - | - | - | - | - | - |")
            continue
        rec = "-"
        u = uni.get(r["s"])
        if r["allocation"] != "uniform" and u is not None and u["ppl"] > base:
            rec = f"{(u['ppl'] - r['ppl']) / (u['ppl'] - base):+.0%}"
        lines.append(
            f"| {r['name']} | {r.get('path', 'cache')} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | {rec} | {r['k_mean']:.4f} / {r['v_mean']:.4f} | "
            f"{r['k_keep_range'][0]}-{r['k_keep_range'][1]} | {r['v_keep_range'][0]}-{r['v_keep_range'][1]} | "
            f"{layout_ratio(cfg, row_budgets(r, sc), args):.2%} | {r['ratio_16bit']:.2%} |")
    sens_path = Path(args.out).with_suffix(".sensitivity.json")
    if sens_path.exists():
        se = json.loads(sens_path.read_text())
        k0 = [row[0][0] for row in se["k_err"]]
        v0 = [row[0][0] for row in se["v_err"]]
        lines += ["", f"Sensitivity: KL (nats/token) measured at keep {se['keeps']} of {se['head_dim']} on "
                  f"{se['tokens']} C4 tokens ({se.get('calib', {}).get('nsamples', '?')} x 512, seed 0), one layer's"
                  f" K or V at a time, {se['seconds']:.0f}s (sum over parts); at keep {se['keeps'][0]}: K "
                  f"{min(k0):.2e}-{max(k0):.2e} (most fragile layer {k0.index(max(k0))}), V {min(v0):.2e}-"
                  f"{max(v0):.2e} (most fragile layer {v0.index(max(v0))})."]
    if sc:
        lines += ["", f"Entropy range (nats, max log {sc['head_dim']} = {math.log(sc['head_dim']):.3f}): K "
                  f"{min(map(min, sc['k_entropy'])):.3f}-{max(map(max, sc['k_entropy'])):.3f}, V "
                  f"{min(map(min, sc['v_entropy'])):.3f}-{max(map(max, sc['v_entropy'])):.3f}; scores took "
                  f"{sc.get('seconds', 0):.0f}s."]
    lines += ["", "Command:", "", "    python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
