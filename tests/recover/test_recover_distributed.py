"""Block recovery under torch.distributed: 2 gloo processes on CPU == 1 process (weights bit for bit)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import checkpoint_tensors

import llmprune
from llmprune.config import CalibConfig, Recipe, RecoveryConfig

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.slow]


def _recipe(calib: str) -> Recipe:
    # 8 sequences in batches of 2: 4 batches over 2 ranks; 6 steps visit every batch and a second chunk
    return Recipe(stages=[llmprune.WandaConfig(sparsity="2:4")],
                  calibration=CalibConfig(source=calib, nsamples=8, seqlen=16, batch_size=2),
                  recover=RecoveryConfig(steps=6, lr=1e-3, batch_size=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, calib: str, out: str) -> None:
    torch.set_num_threads(1)  # the same per-process numerics as the reference
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        llmprune.compress(model_dir, _recipe(calib), out, device="cpu", progress=False, low_memory=True)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path, tiny_model_dir, tiny_calib_file):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = llmprune.compress(str(tiny_model_dir), _recipe(str(tiny_calib_file)), tmp_path / "w1", device="cpu",
                                progress=False, low_memory=True)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_model_dir), str(tiny_calib_file), str(tmp_path / "w2")),
             nprocs=2, join=True)
    a, b = checkpoint_tensors(ref.output), checkpoint_tensors(tmp_path / "w2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the owner's gradient plus zeros: the same steps
    ma = llmprune.formats.checkpoint.read_metadata(ref.output)
    mb = llmprune.formats.checkpoint.read_metadata(tmp_path / "w2")
    for x, y in zip(ma["recovery"]["blocks"], mb["recovery"]["blocks"]):
        for part in ("attn", "mlp"):  # the losses are summed over ranks in another order: fp64 tolerance
            assert x[part]["loss_after"] == pytest.approx(y[part]["loss_after"], rel=1e-9)
            assert x[part]["loss_after"] < x[part]["loss_before"]
