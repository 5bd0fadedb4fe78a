"""Diagnostic: where SliceGPT loses information, and does the sliced model compute what the projections predict?

Runs the *dense* SmolLM2-135M with subspace projections ``P = Q Q^T`` (``Q``: top-``k`` PCA directions of the
dense model's calibration activations) inserted where a sliced model loses information, with no folding, rotation
or shortcut matrices, for three placements of the bases:

* ``one basis per block``: the block input and its attention output projected on the block input's basis ``Q_l``
  (a sliced model whose MLP reads in ``Q_l``: no attention shortcut);
* ``two bases per block``: the block input on ``Q_l``, the residual after attention on its own basis ``M_l``
  (the paper's layout: attention shortcut ``Q_l^T M_l`` and MLP shortcut ``M_l^T Q_{l+1}``);
* ``MLP-input bases only``: ``Q_{l+1} = M_l`` (one shortcut per block, on the attention skip).

Then slices the model for real with ``pca="dense"`` and ``untie_embeddings`` (so the head is not restricted to the
embedding basis): its perplexity must equal the two-bases reference (same projections, computed through folded,
rotated and sliced weights), which checks the implementation against the method.

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
from llmprune.prune import rotate
from llmprune.prune.methods.slicegpt import SliceGPTConfig, slicegpt_prune


def second_moments(model, calib: torch.Tensor, batch: int) -> dict:
    """``X^T X`` (float64) of every block input (``("in", l)``, ``("in", L)`` = final-norm input) and MLP input."""
    stats: dict = {}

    def add(key, x):
        x = x.reshape(-1, x.shape[-1]).double()
        stats[key] = stats.get(key, 0) + x.T @ x

    layers = decoder_layers(model)
    hooks = []
    for i, layer in enumerate(layers):
        def pre(_m, args, kwargs, i=i):
            add(("in", i), args[0] if args else kwargs["hidden_states"])

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, a, i=i: add(("mid", i), a[0])))
    hooks.append(model.model.norm.register_forward_pre_hook(lambda _m, a: add(("in", len(layers)), a[0])))
    for b in range(0, calib.shape[0], batch):
        model(calib[b:b + batch])
    for h in hooks:
        h.remove()
    return stats


def projected(dense, proj, layout: str):
    """A copy of ``dense`` with the residual projected as ``layout`` places the bases (see the module docstring)."""
    model = copy.deepcopy(dense)
    layers = decoder_layers(model)
    prev = proj[("in", 0)]
    for i, layer in enumerate(layers):
        p_in = prev if layout == "mid-only" else proj[("in", i)]
        p_mid = p_in if layout == "one" else proj[("mid", i)]
        state: dict = {}

        def pre(_m, args, kwargs, p_in=p_in, state=state):
            if args:
                state["h"] = args[0] @ p_in
                return (state["h"], *args[1:]), kwargs
            state["h"] = kwargs["hidden_states"] @ p_in
            return args, {**kwargs, "hidden_states": state["h"]}

        layer.register_forward_pre_hook(pre, with_kwargs=True)
        # o_proj's output o becomes P_mid (h + o) - h, so the residual after attention is P_mid (h + o)
        layer.self_attn.o_proj.register_forward_hook(
            lambda _m, _a, out, p_mid=p_mid, state=state: (state["h"] + out) @ p_mid - state["h"])
        prev = p_mid
    p_final = prev if layout == "mid-only" else proj[("in", len(layers))]
    model.model.norm.register_forward_pre_hook(lambda _m, a: (a[0] @ p_final,))
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
    d = dense.config.hidden_size
    k = rotate.sliced_dim(d, args.slicing, 8)

    def ppl(model) -> float:
        return perplexity(model, ids, args.seqlen, args.windows, progress=False).ppl

    proj = {}
    for key, xtx in second_moments(dense, calib, 8).items():
        q = rotate.pca_basis(xtx, 0.01)[1][:, :k].float()
        proj[key] = q @ q.T
    print(f"slicing {args.slicing:.0%}: width {d} -> {k}; {args.nsamples} x {args.seqlen} C4 calibration tokens; "
          f"WikiText-2 ppl over {args.windows} windows of {args.seqlen}", flush=True)
    print(f"dense {ppl(dense):.2f}", flush=True)
    for label, layout in (("one basis per block", "one"), ("two bases per block", "two"),
                          ("MLP-input bases only", "mid-only")):
        print(f"projection reference, {label}: {ppl(projected(dense, proj, layout)):.2f}", flush=True)
    sliced = copy.deepcopy(dense)
    ctx = PruneContext(calib, torch.device("cpu"), batch_size=8, progress=False)
    slicegpt_prune(sliced, SliceGPTConfig(sparsity=args.slicing, pca="dense", untie_embeddings=True), ctx)
    print(f"sliced model (dense PCA, untied head): {ppl(sliced):.2f}", flush=True)


if __name__ == "__main__":
    main()
