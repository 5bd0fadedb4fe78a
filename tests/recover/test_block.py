"""Block reconstruction (llmprune.recover): exact steps, fixed and learned masks, dense targets, batches."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama
from torch import nn

import llmprune
from llmprune.config import RecoveryConfig
from llmprune.errors import ConfigError
from llmprune.prune.recovery import cosine_lr
from llmprune.recover.batches import Schedule, slice_rows
from llmprune.recover.block import TINY, loss_terms, reconstruct
from llmprune.recover.capture import record_dense
from llmprune.sparsity import SparsityPattern, check_nm, nm_mask

P24 = SparsityPattern.parse("2:4")


def _problem(seed: int = 0):
    """A 2:4-pruned linear [6, 8], its dense copy, and 3 batches of inputs [1, 5, 8]."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(8, 6, bias=False)
    dense.weight.data = torch.randn(6, 8, generator=g)
    xs = [torch.randn(1, 5, 8, generator=g) for _ in range(3)]
    sparse = copy.deepcopy(dense)
    sparse.weight.data *= nm_mask(sparse.weight.data.abs(), 2, 4)
    return dense, sparse, xs


def _hand_loss(y: torch.Tensor, t: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """The losses written out: mse over the elements, token: per-token ||y - t||^2 / ||t||^2 over the tokens."""
    if kind == "mse":
        return (y - t).pow(2).sum(), t.numel()
    return ((y - t).pow(2).sum(-1) / t.pow(2).sum(-1)).sum(), t.numel() // t.shape[-1]


def test_loss_terms_exact_values():
    out = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])  # [b=1, s=2, h=2]
    target = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])
    total, count = loss_terms(out, target, "mse")
    assert float(total) == 17.0 and count == 4  # 0 + 1 + 0 + 16
    total, count = loss_terms(out, target, "token")
    assert float(total) == pytest.approx(1 / 2 + 16 / 9, rel=1e-7) and count == 2  # 1 / ||(1,1)||^2 + 16 / ||(3,0)||^2
    # a massive token (x100 in output and target) multiplies its mse share by 1e4 and leaves its token loss alone
    big = torch.tensor([[100.0], [1.0]])
    assert float(loss_terms(out * big, target * big, "mse")[0]) == 1e4 * 1 + 16
    assert float(loss_terms(out * big, target * big, "token")[0]) == pytest.approx(1 / 2 + 16 / 9, rel=1e-6)
    # an all-zero dense token is divided by TINY, not by 0
    total, _ = loss_terms(torch.tensor([[0.5, 0.0]]), torch.zeros(1, 2), "token")
    assert float(total) == pytest.approx(0.25 / TINY) and torch.isfinite(total)
    with pytest.raises(ValueError, match="loss"):
        loss_terms(out, target, "l1")


@pytest.mark.parametrize("kind", ["mse", "token"])
def test_reconstruct_matches_hand_loop_and_lowers_error(kind):
    dense, sparse, xs = _problem()
    targets = [dense(x).detach() for x in xs]
    w0 = sparse.weight.detach().clone()
    keep = w0 != 0
    cfg = RecoveryConfig(steps=7, lr=0.05, eval_batches=0, loss=kind)
    sparse.weight.requires_grad_(True)
    res = reconstruct([sparse], lambda j, lo, hi: sparse(xs[j][lo:hi]), lambda j, lo, hi: targets[j][lo:hi],
                      [1, 1, 1], cfg, pattern=P24)
    # the same steps by hand: batch t % 3, masked gradient, Adam on an fp32 master, re-mask, cosine lr
    w = w0.clone().requires_grad_(True)
    master = w0.clone()
    opt = torch.optim.Adam([master], lr=0.05)
    for t in range(7):
        opt.param_groups[0]["lr"] = cosine_lr(0.05, t, 7)
        total, count = _hand_loss(xs[t % 3] @ w.T, targets[t % 3], kind)
        loss = total / count
        loss.backward()
        master.grad = w.grad * keep
        w.grad = None
        opt.step()
        master.mul_(keep)
        w.data.copy_(master * keep)
    assert torch.equal(sparse.weight.data, w.data)
    def err(wt):
        terms = [_hand_loss(x @ wt.T, y, kind) for x, y in zip(xs, targets)]
        return sum(float(a) for a, _ in terms) / sum(n for _, n in terms)

    assert res.loss_before == pytest.approx(err(w0), rel=1e-6)
    assert res.loss_after == pytest.approx(err(w.data), rel=1e-6)
    assert res.loss_after < 0.9 * res.loss_before and res.steps == 7
    assert torch.equal(sparse.weight.data != 0, keep)  # the mask never changed


def test_learned_mask_keeps_the_pattern_and_can_change():
    dense, sparse, xs = _problem(1)
    targets = [dense(x).detach() for x in xs]
    before = sparse.weight.data != 0
    sparse.weight.requires_grad_(True)
    cfg = RecoveryConfig(steps=40, lr=0.1, mask="learn", flow=1.0, decay=0.0)
    res = reconstruct([sparse], lambda j, lo, hi: sparse(xs[j][lo:hi]), lambda j, lo, hi: targets[j][lo:hi],
                      [1, 1, 1], cfg, pattern=P24)
    w = sparse.weight.data
    nnz = (w != 0).reshape(6, 2, 4).sum(-1)
    assert check_nm(w != 0, 2, 4) and bool((nnz == 2).all())  # exactly 2 of every 4
    assert not torch.equal(w != 0, before)  # the straight-through weights moved the mask
    assert res.loss_after < res.loss_before
    with pytest.raises(ValueError, match="N:M"):
        reconstruct([sparse], lambda *a: sparse(xs[0]), lambda *a: targets[0], [1], cfg,
                    pattern=SparsityPattern.parse(0.5))


def test_schedule_and_row_slicing():
    s = Schedule((1, 3), 4)  # this process holds global batches 1 and 3 of 4
    assert [s.at(t, [3, 2], 2) for t in range(8)] == [None, (0, 0, 2), None, (1, 0, 2), None, (0, 2, 3), None,
                                                        (1, 0, 2)]
    h, pos, cache = torch.zeros(3, 4, 2), torch.zeros(1, 4), torch.arange(3)
    out = slice_rows(((h,), {"position_ids": pos, "cache_position": cache, "mask": torch.ones(3, 1, 4, 4)}), 3, 1, 3)
    assert out[0][0].shape == (2, 4, 2) and out[1]["position_ids"] is pos and out[1]["cache_position"] is cache
    assert out[1]["mask"].shape == (2, 1, 4, 4)


def test_dense_targets_are_the_dense_blocks_outputs(monkeypatch):
    """The recovery is handed the *dense* layer's outputs (recorded before the mask), not the pruned layer's."""
    import llmprune.engine.step as step

    model = tiny_llama(num_hidden_layers=1)
    dense_layer = copy.deepcopy(model.model.layers[0])
    calib = torch.randint(3, 64, (4, 12))
    seen = []

    def spy(layer, targets, dense, cfg, stage, **kw):
        seen.extend(dense)
        return {}

    monkeypatch.setattr(step, "recover_block", spy)
    llmprune.prune(model, llmprune.WandaConfig(sparsity="2:4"), calib, device="cpu", batch_size=2, progress=False,
                   recover=RecoveryConfig(steps=1))
    assert len(seen) == 2
    for d in seen:
        ref = dense_layer(*d.args, **d.kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert torch.equal(d.out, ref)
        pruned = model.model.layers[0](*d.args, **d.kwargs)
        pruned = pruned[0] if isinstance(pruned, tuple) else pruned
        assert not torch.allclose(d.out, pruned)
        assert d.attn_out is not None and d.attn_out.shape == d.out.shape


def test_record_dense_attention_output():
    layer = tiny_llama(num_hidden_layers=1).model.layers[0]
    calls = []
    layer.self_attn.register_forward_hook(lambda m, a, o: calls.append(o[0]))
    with record_dense(layer, layer.self_attn) as dense:
        x = torch.randn(2, 6, 64)
        emb = tiny_llama(num_hidden_layers=1).model.rotary_emb(x, torch.arange(6)[None])
        layer(x, position_embeddings=emb, attention_mask=None)
    assert len(dense) == 1 and torch.equal(dense[0].attn_out, calls[0]) and dense[0].rows == 2


@pytest.mark.parametrize("mask", ["fixed", "learn"])
def test_prune_with_block_recovery_keeps_pattern_and_lowers_error(mask):
    # magnitude: the mask does not depend on the (recovered) previous layers' outputs, so it can be compared
    calib = torch.randint(3, 64, (6, 16))
    plain = tiny_llama()
    llmprune.prune(plain, llmprune.MagnitudeConfig(sparsity="2:4"), calib, device="cpu", progress=False)
    model = tiny_llama()
    rep = llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), calib, device="cpu", batch_size=3,
                         progress=False, recover=RecoveryConfig(steps=12, lr=3e-3, batch_size=2, mask=mask))
    rec = rep.recovery()
    assert [r["layer"] for r in rec] == [0, 1] and all(set(r) == {"layer", "attn", "mlp"} for r in rec)
    assert all(r[p]["loss_after"] < r[p]["loss_before"] for r in rec for p in ("attn", "mlp"))
    for (name, a), (_, b) in zip(plain.named_modules(), model.named_modules()):
        if isinstance(a, nn.Linear) and ".layers." in name:
            assert check_nm(b.weight != 0, 2, 4), name
            if mask == "fixed":
                assert torch.equal(a.weight != 0, b.weight != 0), name  # the mask never changes
            assert not torch.equal(a.weight, b.weight), name  # but the kept weights moved
    assert rep.modules[0].recovery["part"] == "attn"


def test_whole_scope_and_unstructured():
    calib = torch.randint(3, 64, (4, 16))
    model = tiny_llama()
    rep = llmprune.prune(model, llmprune.SparseGPTConfig(sparsity=0.5, blocksize=32), calib, device="cpu",
                         batch_size=2, progress=False, recover=RecoveryConfig(steps=5, scope="whole"))
    assert all(set(r) == {"layer", "block"} for r in rep.recovery())
    assert all(abs(m.sparsity - 0.5) < 0.02 for m in rep.modules)


def test_recovery_config_validation():
    with pytest.raises(ConfigError, match="recover.scope"):
        RecoveryConfig(scope="mlp")
    with pytest.raises(ConfigError, match="recover.steps"):
        RecoveryConfig(steps=0)
    with pytest.raises(ConfigError, match="recover.loss"):
        RecoveryConfig(loss="l1")
    assert RecoveryConfig().peak_lr == 2e-3 and RecoveryConfig(mode="e2e").peak_lr == 2e-4  # per-mode default
    assert RecoveryConfig(lr=5e-4).peak_lr == 5e-4 and RecoveryConfig().loss == "mse"
    with pytest.raises(ConfigError, match="recover.lr"):
        RecoveryConfig(lr=0.0)
    with pytest.raises(ConfigError, match="learn"):
        RecoveryConfig(mode="e2e", mask="learn")
    with pytest.raises(ConfigError, match="N:M"):
        llmprune.prune(tiny_llama(), llmprune.WandaConfig(sparsity=0.5), torch.randint(3, 64, (2, 8)),
                       device="cpu", progress=False, recover=RecoveryConfig(mask="learn"))


def test_e2e_distillation_keeps_zeros_and_lowers_loss():
    calib = torch.randint(3, 64, (4, 16))
    model = tiny_llama()
    rep = llmprune.prune(model, llmprune.WandaConfig(sparsity="2:4"), calib, device="cpu", batch_size=2,
                         progress=False, recover=RecoveryConfig(mode="e2e", steps=10, lr=1e-3, batch_size=2,
                                                                hidden_weight=0.5))
    d = rep.distill
    assert d["steps"] == 10 and d["loss_after"] < d["loss_before"]
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            assert check_nm(mod.weight != 0, 2, 4) and (mod.weight == 0).float().mean() == 0.5, name
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_block_then_e2e_is_block_recovery_then_the_distillation():
    from llmprune.recover.distill import distill

    calib = torch.randint(3, 64, (4, 16))
    torch.manual_seed(0)
    base = tiny_llama()
    chained, stepwise, teacher = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    both = RecoveryConfig(mode="block+e2e", steps=3, distill_steps=4, distill_lr=1e-3, batch_size=2)
    assert both.block is both and both.peak_lr == 2e-3  # the block part keeps block's default lr
    assert both.e2e == RecoveryConfig(mode="e2e", steps=4, lr=1e-3, batch_size=2)
    rep = llmprune.prune(chained, llmprune.WandaConfig(sparsity="2:4"), calib, device="cpu", batch_size=2,
                         progress=False, recover=both)
    ref = llmprune.prune(stepwise, llmprune.WandaConfig(sparsity="2:4"), calib, device="cpu", batch_size=2,
                         progress=False, recover=RecoveryConfig(mode="block", steps=3, batch_size=2))
    assert ref.distill is None and rep.recovery() == ref.recovery()  # the same block part
    d = distill(stepwise, teacher, calib, both.e2e, device=torch.device("cpu"))
    assert rep.distill["steps"] == 4 and rep.distill["loss_before"] == d["loss_before"]
    assert rep.distill["loss_after"] == d["loss_after"] < d["loss_before"]
    for (name, a), (_, b) in zip(chained.named_modules(), stepwise.named_modules()):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight, b.weight), name
            if ".layers." in name:
                assert check_nm(a.weight != 0, 2, 4), name


def test_distill_options_belong_to_block_then_e2e():
    assert RecoveryConfig(mode="block+e2e").e2e.steps == 128 and RecoveryConfig(mode="block+e2e").e2e.peak_lr == 2e-4
    assert RecoveryConfig(mode="block").e2e is None and RecoveryConfig(mode="e2e").block is None
    with pytest.raises(ConfigError, match="distill_steps"):
        RecoveryConfig(mode="e2e", distill_steps=10)
    with pytest.raises(ConfigError, match="recover.distill_lr"):
        RecoveryConfig(mode="block+e2e", distill_lr=0.0)
    learned = RecoveryConfig(mode="block+e2e", mask="learn")  # the mask learned per block, then held fixed
    assert learned.block.mask == "learn" and learned.e2e.mask == "fixed"


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_save_time_check_refuses_filled_zeros(sparsity):
    from llmprune.engine.step import PruneIntegrityError, verify_model

    model = tiny_llama()
    stage = llmprune.MagnitudeConfig(sparsity=sparsity)
    rep = llmprune.prune(model, stage, device="cpu", progress=False)
    verify_model(model, [stage], rep.modules)  # as pruned: fine
    w = model.model.layers[1].mlp.up_proj.weight.data
    w[w == 0] = 1e-3  # a recovery step that filled the zeros back in
    with pytest.raises(PruneIntegrityError, match="up_proj"):
        verify_model(model, [stage], rep.modules)
