"""torch.distributed pruning: 2 gloo processes on CPU == 1 process, bit for bit (Wanda and SparseGPT)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import llmprune
from llmprune.config import CalibConfig, Recipe

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

METHODS = {
    "wanda": lambda: llmprune.WandaConfig(sparsity="2:4"),
    "sparsegpt": lambda: llmprune.SparseGPTConfig(sparsity=0.5, blocksize=32),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, calib: str, out: str, jobs: list) -> None:
    torch.set_num_threads(1)  # the same per-process numerics as the reference
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for method, reduce in jobs:
            # 8 sequences in batches of 2: 4 batches, 2 rounds over 2 ranks.
            recipe = Recipe(stages=[METHODS[method]()],
                            calibration=CalibConfig(source=calib, nsamples=8, seqlen=16, batch_size=2))
            llmprune.compress(model_dir, recipe, f"{out}/{method}-{reduce}-w{world}", device="cpu",
                              progress=False, low_memory=True, dist_reduce=reduce)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_two_gloo_processes_bit_identical_to_one(tmp_path, tiny_model_dir, tiny_calib_file):
    jobs = [(m, r) for m in METHODS for r in ("exact", "sum")]
    args = (str(tiny_model_dir), str(tiny_calib_file), str(tmp_path))
    threads = torch.get_num_threads()
    try:  # the single-process reference, here (spawning costs an import of transformers per process)
        torch.set_num_threads(1)
        for method in METHODS:
            recipe = Recipe(stages=[METHODS[method]()],
                            calibration=CalibConfig(source=str(tiny_calib_file), nsamples=8, seqlen=16, batch_size=2))
            llmprune.compress(str(tiny_model_dir), recipe, tmp_path / f"{method}-exact-w1", device="cpu",
                              progress=False, low_memory=True)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), *args, jobs), nprocs=2, join=True)
    for method in METHODS:
        ref = _tensors(tmp_path / f"{method}-exact-w1")
        exact = _tensors(tmp_path / f"{method}-exact-w2")
        summed = _tensors(tmp_path / f"{method}-sum-w2")
        assert ref.keys() == exact.keys() == summed.keys()
        pruned = [k for k in ref if ".layers." in k and k.endswith("proj.weight")]
        assert pruned and all((ref[k] == 0).float().mean() == 0.5 for k in pruned)
        for k in ref:
            assert torch.equal(ref[k] == 0, exact[k] == 0), f"{method}: mask differs at {k}"
            assert torch.equal(ref[k], exact[k]), f"{method}: weight differs at {k}"
            rel = ((ref[k] - summed[k]).norm() / ref[k].norm().clamp_min(1e-12)).item()
            assert rel < 1e-4, f"{method} sum-reduce: {k} differs by {rel:.2e}"
        meta = llmprune.formats.checkpoint.read_metadata(tmp_path / f"{method}-exact-w2")
        assert meta["engine"] == {"streaming": True, "world_size": 2, "dist_reduce": "exact"}


def test_reduce_hook_allreduces_sum_and_count():
    from llmprune.calibration.distributed import DistContext, allreduce_stats, make_reduce, owned_batches
    from llmprune.calibration.stats import ActSqNorm, Hessian

    assert make_reduce(DistContext()) is None
    assert owned_batches(5, DistContext(world=2, rank=1)) == [1, 3]
    acc = ActSqNorm(3, torch.device("cpu"))
    acc.add(torch.ones(2, 3))
    allreduce_stats({"x": {"act_sq_norm": acc}}, DistContext())  # single process: unchanged
    assert acc.count == 2 and torch.equal(acc.sum, torch.full((3,), 2.0))
    h = Hessian(3, torch.device("cpu"))
    x = torch.randn(5, 3)
    h.add(x[:2])
    h.add(x[2:])
    assert torch.allclose(h.result(), 2 * x.t() @ x / 5, atol=1e-6)


def test_prune_layerwise_reduce_hook_sees_accumulators_before_masks():
    from helpers import TINY_VOCAB, tiny_llama

    from llmprune.calibration.capture import capture_layer_inputs
    from llmprune.engine.layerwise import prune_layerwise
    from llmprune.prune.registry import method_for_config

    model = tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = llmprune.WandaConfig(sparsity="2:4")
    seen = []

    def reduce(stats):  # e.g. llmprune.calibration.distributed.make_reduce(ctx); here: record what the hook gets
        seen.append({n: s["act_sq_norm"].count for n, s in stats.items()})

    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=2)
    prune_layerwise(model, method_for_config(cfg), cfg, inputs, device=torch.device("cpu"), ignore=lambda n: False,
                    progress=False, reduce=reduce)
    assert len(seen) == 2 and all(len(s) == 7 and set(s.values()) == {32} for s in seen)
