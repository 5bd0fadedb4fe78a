"""Distil an already-pruned checkpoint from the dense model (``llmprune.recover.distill``) and report WikiText-2 ppl.

The second half of ``--recover block+e2e`` run on a saved block-recovered checkpoint, so a long block run need
not be repeated to measure the distillation on top (``tests/recover/test_block.py`` checks that the chained mode
equals block recovery followed by :func:`~llmprune.recover.distill.distill`)::

    OMP_NUM_THREADS=1 python eval/distill_checkpoint.py PRUNED_DIR OUT_DIR --steps 128 --windows 100

Prints one JSON line: perplexity before/after (non-overlapping 512-token windows), the distillation's losses,
and the smallest zero fraction over the decoder linears (0.5 for a kept 2:4 pattern).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from llmprune.calibration.data import load_calibration
from llmprune.config import CalibConfig, RecoveryConfig
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.model.loading import load_pretrained, load_tokenizer
from llmprune.recover.distill import distill

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student")
    ap.add_argument("output")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default: e2e's, 2e-4)")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--calib", default=str(SHARED / "c4" / "c4_validation_2k.parquet"))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    tok = load_tokenizer(args.teacher)
    teacher = load_pretrained(args.teacher, dtype="float32")
    student = load_pretrained(args.student, dtype="float32")
    calib = load_calibration(CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                         seed=args.seed), tok, progress=False)
    ids = token_stream(tok, wikitext2_text(SHARED / "wikitext2" / "wiki.test.raw.txt"))
    before = perplexity(student, ids, seqlen=512, max_windows=args.windows, progress=False).ppl
    t0 = time.perf_counter()
    rep = distill(student, teacher, calib, RecoveryConfig(mode="e2e", steps=args.steps, lr=args.lr),
                  device=torch.device("cpu"))
    after = perplexity(student, ids, seqlen=512, max_windows=args.windows, progress=False).ppl
    zero = min(float((m.weight == 0).float().mean()) for n, m in student.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n)
    student.save_pretrained(args.output)
    print(json.dumps({"ppl_before": before, "ppl_after": after, "distill": rep, "min_zero_frac": zero,
                      "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
