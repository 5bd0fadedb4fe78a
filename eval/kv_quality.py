"""Quality table: WikiText-2 perplexity of SmolLM2-135M with the pruned bitmap KV cache active.

Protocol:
  * WikiText-2 raw test joined with "\\n\\n", tokenized once, non-overlapping --seqlen windows (default 512), the first
    --windows of them (default 10), mean next-token NLL over all predicted tokens (the foundation's protocol);
  * "dense, no cache" is the foundation's one-pass evaluation (`llmprune.perplexity`);
  * every KV row uses `llmprune.evaluate.perplexity.perplexity_with_cache`: each window starts from an empty `BitmapKVCache`
    and is fed in chunks of exactly --kv-window tokens, so chunk j attends to tokens [0, j*window) pruned and
    compressed and to itself dense/causal -- the cache state token-by-token decode would see;
  * bytes: stored (bitmaps + offsets + kept values + dense window) / dense cache bytes, at the end of a window,
    counted for a 16-bit cache (values 2 bytes) although the CPU run is fp32; "format" is the compressed part alone.

Usage:
    python eval/kv_quality.py --data ../shared/data/wikitext2/wiki.test.raw.txt --windows 10 \\
        --out eval/results/kv_quality.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import llmprune
from llmprune.evaluate.perplexity import perplexity, perplexity_with_cache, token_stream, wikitext2_text
from llmprune.formats.bitmap import expected_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/wikitext2/wiki.test.raw.txt")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--kv-window", type=int, default=32)
    ap.add_argument("--sparsities", default="0,0.5,0.7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/results/kv_quality.md")
    ap.add_argument("--no-dense", action="store_true", help="skip the one-pass dense row (for split runs)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only build --out from the .json files of earlier (split) runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = llmprune.load(args.model, dtype="float32", device="cpu")
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    rows = []
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        rows.sort(key=lambda r: r.get("sparsity", -1.0))
        cmds = [part.get("command", "") for part in parts]
        write(args, model, head_dim, rows, cmds + ["python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])])
        return
    tok = llmprune.load_tokenizer(args.model)
    ids = token_stream(tok, wikitext2_text(args.data))

    if not args.no_dense:
        base = perplexity(model, ids, args.seqlen, args.windows, progress=False)
        rows.append({"setting": "dense, no cache", "ppl": base.ppl, "seconds": base.seconds, "tokens": base.tokens})
        print(f"dense no cache: ppl {base.ppl:.4f} ({base.seconds:.0f}s)", flush=True)
    for s in [float(x) for x in args.sparsities.split(",")]:
        r = perplexity_with_cache(model, ids, args.seqlen, args.windows, k_sparsity=s, v_sparsity=s,
                                  window=args.kv_window, backend="torch", progress=False)
        rows.append({
            "setting": f"KV sparsity {s:g} (K and V)", "sparsity": s, "ppl": r.ppl, "seconds": r.seconds,
            "tokens": r.tokens, "ratio_16bit": r.bytes_ratio_16bit, "ratio_run_dtype": r.bytes_ratio,
            "format_ratio_16bit": expected_ratio(head_dim, s) if s > 0 else None,
        })
        print(f"kv sparsity {s:g}: ppl {r.ppl:.4f}, 16-bit bytes ratio {r.bytes_ratio_16bit:.3f} ({r.seconds:.0f}s)",
              flush=True)

    write(args, model, head_dim, rows, ["python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])])


def write(args, model, head_dim, rows, cmds) -> None:
    base = next((r for r in rows if r["setting"] == "dense, no cache"), None)
    base_ppl = base["ppl"] if base else float("nan")
    lines = [
        "# Bitmap KV cache: quality on SmolLM2-135M",
        "",
        f"Model `{args.model}` (SmolLM2-135M-Instruct, {model.config.num_hidden_layers} layers, "
        f"{model.config.num_attention_heads} query / {model.config.num_key_value_heads} KV heads, head_dim {head_dim}),"
        f" fp32 on CPU ({platform.processor() or platform.machine()}, {args.threads} threads), "
        f"llmprune {llmprune.__version__}, torch {torch.__version__}.",
        "",
        f"WikiText-2 test, first **{args.windows} windows x {args.seqlen} tokens** ({rows[0]['tokens']} predicted "
        f"tokens), mean NLL. KV rows: pruned bitmap cache active, dense window {args.kv_window} tokens, each window fed "
        f"in chunks of {args.kv_window} tokens (= token-by-token decode cache state; see `perplexity_with_cache`). "
        "Bytes are counted for a 16-bit cache (2-byte values) although this run is fp32: stored = bitmaps (8 B/tile)"
        " + offsets (4 B/tile) + kept values + the dense window, at the end of a window (512 tokens, 32 of them "
        "still dense); *format* is the compressed part alone. Times are wall seconds on a shared 2-core machine under "
        "heavy load (not a speed measurement).",
        "",
        "| setting | ppl | delta vs dense | cache bytes / dense (16-bit) | format only | time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio_16bit']:.1%}" if "ratio_16bit" in r else "-"
        fmt = f"{r['format_ratio_16bit']:.1%}" if r.get("format_ratio_16bit") else "-"
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {r['ppl'] - base_ppl:+.3f} | {ratio} | {fmt} | "
                     f"{r['seconds']:.0f}s |")
    lines += ["", "Commands:", ""] + [f"    {c}" for c in cmds] + [""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows, "command": cmds[-1],
                                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                                                   indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
