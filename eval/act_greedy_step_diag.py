"""Diagnostic: does the greedy allocation's step size decide whether it beats uniform? (SmolLM2-135M, first layers)

Runs ``act_threshold_tables`` (greedy, target 0.5, block error on 1024 calibration tokens) on the first --layers
decoder layers of SmolLM2-135M with --nsamples x 512 C4 tokens (seed 0), once per step in --steps, and prints each
layer's relative block output error for greedy and uniform and the greedy group sparsities (q/k/v, o, gate/up,
down) at 0.5 and 0.25. Output goes to stdout (copy it into eval/results/act_greedy_step_diag.md).

Usage:
    OMP_NUM_THREADS=1 python eval/act_greedy_step_diag.py --shared ../shared
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import llmprune
from llmprune.calibration.data import load_calibration
from llmprune.config import CalibConfig
from llmprune.runtime.actsparse.calibrate import act_threshold_tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--steps", default="0.1,0.025")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = llmprune.load("smollm2-135m", dtype="float32")
    tok = llmprune.load_tokenizer("smollm2-135m")
    model.model.layers = nn.ModuleList(list(model.model.layers)[: args.layers])
    model.config.num_hidden_layers = args.layers
    cal = CalibConfig(source=f"{args.shared}/data/c4/c4_validation_2k.parquet", nsamples=args.nsamples, seqlen=512,
                      seed=0, batch_size=2)
    ids = load_calibration(cal, tok, model)
    for step in (float(s) for s in args.steps.split(",")):
        t = time.time()
        th = act_threshold_tables(model, ids, torch.device("cpu"), 0.5, "greedy", batch_size=2, greedy_tokens=1024,
                                  step=step)
        e = th.info["block_error"]
        print("step", step, "greedy", [f"{x:.3e}" for x in e["greedy"]], "uniform",
              [f"{x:.3e}" for x in e["uniform"]], f"{time.time() - t:.0f}s", flush=True)
        for level in (0.5, 0.25):
            print(f"  group sparsities at {level}:",
                  [[round(float(v), 2) for v in row] for row in th.group_sparsities(level)])


if __name__ == "__main__":
    main()
