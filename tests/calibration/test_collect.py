"""The statistics collector: hooks feed accumulators while batches run, and are always removed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmprune.calibration.collect import collect
from llmprune.calibration.data import clip_seqlen
from llmprune.calibration.stats import ActSqNorm
from llmprune.config import CalibConfig


def _lin():
    return nn.Linear(3, 2, bias=False)


def test_collect_feeds_totals_and_shows_each_batch():
    lin = _lin()
    acc = ActSqNorm(3, torch.device("cpu"))
    xs = [torch.randn(2, 3), torch.randn(4, 3)]
    seen = []
    collect({"lin": lin}, {"lin": {"a": acc}}, [lambda x=x: (x, lin(x)) for x in xs],
            on_batch=lambda i, io, fed: seen.append((i, io[0].shape[0], fed["lin"]["a"] is acc)))
    assert seen == [(0, 2, True), (1, 4, True)]
    assert acc.count == 6 and torch.allclose(acc.result(), torch.cat(xs).pow(2).mean(0))
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_collect_fresh_accumulators_per_batch_and_hooks_removed_on_error():
    lin = _lin()
    total = ActSqNorm(3, torch.device("cpu"))
    fed_counts = []
    collect({"lin": lin}, {"lin": {"a": total}}, [lambda: lin(torch.ones(2, 3)), lambda: None],
            fresh=lambda: {"lin": {"a": ActSqNorm(3, torch.device("cpu"))}},
            on_batch=lambda i, _v, fed: fed_counts.append(fed["lin"]["a"].count))
    assert fed_counts == [2, 0] and total.count == 0  # the totals are the caller's to merge into

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        collect({"lin": lin}, {"lin": {"a": total}}, [boom])
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_clip_seqlen_to_model_context():
    cfg = CalibConfig(seqlen=4096)
    assert clip_seqlen(cfg, SimpleNamespace(max_position_embeddings=256)).seqlen == 256
    assert clip_seqlen(cfg, SimpleNamespace(max_position_embeddings=8192)) is cfg
    assert clip_seqlen(cfg, SimpleNamespace()) is cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_sq_norm_term_in_row_blocks_matches_the_whole_sum(dtype):
    x = (torch.randn(3, 700, 300) * torch.rand(300) * 10).to(dtype)  # 2100 rows: several row blocks of 218
    term, count = ActSqNorm.term(x)
    ref = x.float().reshape(-1, 300).pow(2).sum(0)
    assert count == 2100 and term.dtype == torch.float32
    assert ((term - ref).norm() / ref.norm()).item() < 1e-6
