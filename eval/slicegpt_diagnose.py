"""Diagnostic: is SliceGPT's loss on SmolLM2 the implementation or the projection itself?

Slices SmolLM2-135M with ``pca="dense"`` (bases from the dense model's activations), records the bases ``Q_l``
``[d, k]``, and evaluates the *dense* model with the same subspace projections ``P_l = Q_l Q_l^T`` inserted where the
sliced model loses information (each block input and attention output, the final norm's input) -- no folding, no
rotation, no shortcut matrices. If this reference is about as bad as the sliced model, the damage comes from
deleting the directions, not from the code. Also evaluates projections at single places (layer 0 only, layers
1-29, the final norm only).

Usage:
    OMP_NUM_THREADS=1 python eval/slicegpt_diagnose.py --shared ../shared --slicing 0.1 --windows 4 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import llmprune
from llmprune.api import PruneContext
from llmprune.calibration import load_calibration
from llmprune.evaluate.perplexity import perplexity, token_stream, wikitext2_text
from llmprune.model.access import decoder_layers
from llmprune.prune.methods.slicegpt import SliceGPTConfig, slicegpt_prune
from llmprune.prune.methods.slicegpt_signals import pca_top


def projected(dense, projections: list[torch.Tensor], active: set[int], final: bool):
    """A copy of ``dense`` whose residual is projected by ``projections[l]`` at the blocks in ``active``."""
    model = copy.deepcopy(dense)
    for idx, layer in enumerate(decoder_layers(model)):
        if idx not in active:
            continue
        p = projections[idx]

        def pre(_mod, args, kwargs, p=p):
            if args:
                return (args[0] @ p, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ p}

        layer.register_forward_pre_hook(pre, with_kwargs=True)
        layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, out, p=p: out @ p)
    if final:
        model.model.norm.register_forward_pre_hook(lambda _m, a: (a[0] @ projections[-1],))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--slicing", type=float, default=0.1)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    shared = Path(args.shared)
    tok = llmprune.load_tokenizer("smollm2-135m")
    dense = llmprune.load("smollm2-135m", dtype="float32")
    ids = token_stream(tok, wikitext2_text(shared / "data" / "wikitext2" / "wiki.test.raw.txt"))
    calib = load_calibration(llmprune.CalibConfig(source=str(shared / "data" / "c4" / "c4_validation_2k.parquet"),
                                                  nsamples=args.nsamples, seqlen=args.seqlen, seed=0), tok, dense)
    ctx = PruneContext(calib, torch.device("cpu"), batch_size=8, progress=False)

    def ppl(model) -> float:
        return perplexity(model, ids, args.seqlen, args.windows, progress=False).ppl

    bases: list[torch.Tensor] = []

    def record(xs, k):
        bases.append(pca_top(xs, k, 0.01))
        return bases[-1]

    sliced = copy.deepcopy(dense)
    slicegpt_prune(sliced, SliceGPTConfig(sparsity=args.slicing, pca="dense"), ctx, basis=record)
    proj = [(q @ q.T).float() for q in bases]
    n = len(decoder_layers(dense))
    print(f"dense {ppl(dense):.2f}", flush=True)
    print(f"sliced {args.slicing:.0%} (dense PCA) {ppl(sliced):.2f}", flush=True)
    for label, active, final in (("projections everywhere", set(range(n)), True), ("layer 0 only", {0}, False),
                                 (f"layers 1-{n - 1}", set(range(1, n)), False), ("final norm only", set(), True)):
        print(f"reference, {label}: {ppl(projected(dense, proj, active, final)):.2f}", flush=True)


if __name__ == "__main__":
    main()
