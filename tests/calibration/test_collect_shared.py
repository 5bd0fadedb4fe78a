"""The collector's two savings are exact: one term per shared input tensor, and batches stopped once every
module was fed (``stop_early``) give the statistics of full batches, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune.calibration.collect import collect
from llmprune.calibration.stats import ActSqNorm, Hessian


class Block(nn.Module):
    """q/k/v read one tensor (as in a decoder layer); ``down`` runs last and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.down = nn.Linear(4, 4, bias=False)
        self.down_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) + self.k(x) * self.v(x)
        self.down_calls += 1
        return self.down(torch.relu(h))


def _accs(block: Block) -> dict:
    dev = torch.device("cpu")
    return {n: {"act_sq_norm": ActSqNorm(4, dev), "hessian": Hessian(4, dev)} for n in ("q", "k", "v", "down")}


def _run(stop_early: bool):
    block = Block()
    mods = {n: getattr(block, n) for n in ("q", "k", "v", "down")}
    accs = _accs(block)
    xs = [torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    seen = []
    collect(mods, accs, [lambda x=x: block(x) for x in xs], stop_early=stop_early,
            on_batch=lambda i, value, _fed: seen.append(value is None))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in mods.values())
    return block, accs, xs, seen


def test_stop_early_and_shared_terms_are_bit_identical():
    full_block, full, xs, full_seen = _run(stop_early=False)
    fast_block, fast, _, fast_seen = _run(stop_early=True)
    assert full_seen == [False] * 4
    assert fast_seen == [False, True, True, True]  # batch 0 runs in full and shows the order; the rest stop
    for name in full:
        for stat in full[name]:
            assert fast[name][stat].count == full[name][stat].count == 60
            assert torch.equal(fast[name][stat].sum, full[name][stat].sum)
    # the direct per-module sums (no sharing) are the same bits too
    direct = ActSqNorm(4, torch.device("cpu"))
    for x in xs:
        direct.add(x)
    assert torch.equal(direct.sum, full["q"]["act_sq_norm"].sum)
    assert torch.equal(full["q"]["hessian"].sum, full["v"]["hessian"].sum)


def test_stop_early_never_skips_a_module_that_was_not_fed():
    """A batch that reaches the last module before another one (order changes) runs in full."""
    lin_a, lin_b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    accs = {n: {"a": ActSqNorm(2, torch.device("cpu"))} for n in ("a", "b")}
    x = torch.ones(1, 2)
    batches = [lambda: lin_b(lin_a(x)), lambda: lin_a(lin_b(x)), lambda: lin_b(lin_a(x))]
    collect({"a": lin_a, "b": lin_b}, accs, batches, stop_early=True)
    assert accs["a"]["a"].count == accs["b"]["a"].count == 3


def test_memo_sees_in_place_changes():
    """The same tensor object modified in place between two modules is not taken from the memo."""
    lin_a, lin_b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    accs = {n: {"a": ActSqNorm(2, torch.device("cpu"))} for n in ("a", "b")}

    def run():
        x = torch.ones(1, 2)
        lin_a(x)
        x.mul_(3)
        lin_b(x)

    collect({"a": lin_a, "b": lin_b}, accs, [run])
    assert accs["a"]["a"].sum.tolist() == [1.0, 1.0] and accs["b"]["a"].sum.tolist() == [9.0, 9.0]


def test_parquet_texts_match_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from llmprune.calibration.data import _load_file_texts
    from llmprune.errors import LlmpruneError

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a b", "", None, " ", "c"], "n": [1, 2, 3, 4, 5]}), path)
    assert _load_file_texts(path, "text") == ["a b", "c"]
    with pytest.raises(LlmpruneError, match="has no 'body' column \\(columns: text, n\\)"):
        _load_file_texts(path, "body")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file")
    with pytest.raises(LlmpruneError, match="cannot read calibration file"):
        _load_file_texts(bad, "text")
