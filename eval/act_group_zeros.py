"""How often TEAL thresholds zero a whole 2:4 group of inputs: the bytes an input-sparse 2:4 kernel could skip.

Packed 2:4 keeps 2 of every 4 consecutive inputs per output row, and which 2 differs from row to row, so the values
one zeroed input selects are scattered over the rows (no contiguous run to skip). A kernel can only skip a group's
bytes for all rows when all 4 of its inputs are zeroed. This script measures that share on real activations:
SmolLM2-135M, thresholds from ``llmprune calibrate-act``, WikiText-2 tokens, every decoder linear's input::

    OMP_NUM_THREADS=1 python eval/act_group_zeros.py ACT_DIR --tokens 1024

Prints one JSON line per target: the zeroed share of input entries and the share of all-zero groups of 4 (mean
over linears, weighted by each linear's weight count, so it is the share of weight bytes such a kernel could skip).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llmprune.evaluate.perplexity import token_stream, wikitext2_text
from llmprune.model.loading import load_pretrained, load_tokenizer
from llmprune.runtime.actsparse.apply import ActSparseLinear, attach_act_sparsity
from llmprune.runtime.actsparse.thresholds import load_thresholds

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("thresholds")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--targets", default="0.25,0.4,0.5")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    model = load_pretrained(args.model, dtype="float32").eval()
    ids = token_stream(tok, wikitext2_text(SHARED / "wikitext2" / "wiki.test.raw.txt"))[:, : args.tokens]
    th = load_thresholds(args.thresholds)
    for target in (float(t) for t in args.targets.split(",")):
        rt = attach_act_sparsity(model, th, target=target, prefill=True)
        stats = []  # (weights, zeroed share, all-zero-group share)

        def hook(mod, inp, stats=stats):
            x = inp[0].reshape(-1, mod.in_features)
            zero = x.abs().float() < mod.threshold
            groups = zero.view(zero.shape[0], -1, 4).all(-1)
            stats.append((mod.weight.numel(), float(zero.float().mean()), float(groups.float().mean())))

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, ActSparseLinear)]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        w = sum(s[0] for s in stats)
        print(json.dumps({"target": target, "allocation": rt.allocation, "tokens": int(ids.shape[1]),
                          "linears": len(stats),
                          "zeroed": round(sum(s[0] * s[1] for s in stats) / w, 4),
                          "all_zero_groups_of_4": round(sum(s[0] * s[2] for s in stats) / w, 4),
                          "independent_estimate": round(sum(s[0] * s[1] ** 4 for s in stats) / w, 4)}))


if __name__ == "__main__":
    main()
