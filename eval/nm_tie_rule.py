"""Why N:M masks keep ``topk``'s choice among tied scores: magnitude N:M with topk vs a fixed positional tie rule.

The embedded SmolLM2-135M weights come from a 4-bit GGUF, so many weights of a group of ``M`` have equal
magnitudes. A mask built by pairwise ranking with the rule "of two equal scores the earlier column wins" is ~3x
faster than ``topk`` + scatter on a CPU, but it prunes the same positions of every tied group. This script prunes
every decoder linear by magnitude both ways and prints how many mask entries differ and the WikiText-2 perplexity
of each (non-overlapping 512-token windows, fp32).

Usage:
    python eval/nm_tie_rule.py --sparsity 2:4 --windows 20 [--model smollm2-135m] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.model.access import decoder_layers, linear_modules
from llmprune.model.loading import resolve_model
from llmprune.sparsity import SparsityPattern, nm_mask

log = logging.getLogger("nm_tie_rule")
ROOT = Path(__file__).resolve().parents[1]


def earlier_column_wins(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``[out, in]`` keep-mask of the ``n`` highest of every ``m`` columns, ties ranked by column (earlier first)."""
    rows, cols = score.shape
    vals = [v.contiguous() for v in score.reshape(rows, cols // m, m).unbind(-1)]
    above = [torch.zeros(rows, cols // m, dtype=torch.uint8) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_first = vals[j] > vals[i]
            above[i] += j_first
            above[j] += j_first.logical_not_()
    return torch.stack(above, -1).lt_(n).view(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pattern = SparsityPattern.parse(args.sparsity)
    if not pattern.is_nm:
        ap.error("--sparsity must be N:M")
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    ids = token_stream(tok, wikitext2_text(Path(args.shared) / "data" / "wikitext2" / "wiki.test.raw.txt"))
    rules = {"topk (llmprune)": lambda s: nm_mask(s, pattern.n, pattern.m),
             "earlier column wins": lambda s: earlier_column_wins(s, pattern.n, pattern.m)}
    for name, rule in rules.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        differ = total = 0
        with torch.no_grad():
            for layer in decoder_layers(model):
                for lin in linear_modules(layer).values():
                    score = lin.weight.data.abs()
                    keep = rule(score)
                    differ += int((keep != nm_mask(score, pattern.n, pattern.m)).sum())
                    total += keep.numel()
                    lin.weight.data.mul_(keep)
        ppl = perplexity(model, ids, seqlen=512, max_windows=args.windows, progress=False)
        log.info("%s: mask entries differing from topk %d / %d (%.2f%%), ppl %.2f (%d x 512)", name, differ, total,
                 100 * differ / total, ppl.ppl, args.windows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
