"""CFSP LoRA recovery through peft: ranks follow ``rank_pattern``, merge is ``W + 2 B A``, rank 0 is untouched."""

import torch
from helpers import TINY_VOCAB, tiny_llama
from torch import nn

from llmprune.model.access import decoder_layers, linear_modules
from llmprune.prune import recovery
from llmprune.prune.recovery import add_lora, lora_config, lora_targets, recover

IDS = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
RANKS = [3, 0, 1]


def _adapters(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_config_ranks_follow_rank_pattern_and_skip_rank_zero():
    model = tiny_llama(num_hidden_layers=12)
    ranks = [2] + [0] * 10 + [5]
    targets = lora_targets(model, ranks)
    assert set(targets) == {f"model.layers.{i}.{n}" for i in (0, 11) for n in linear_modules(decoder_layers(model)[i])}
    peft_model = add_lora(model, ranks)
    got = {n: (m.r["default"], m.scaling["default"]) for n, m in _adapters(model).items()}
    # layers.1.* must not catch layers.11.* (escaped patterns), layers 1..10 get no adapter at all
    assert got == {n: (r, 2.0) for n, r in targets.items()}
    assert lora_config(targets).rank_pattern["model\\.layers\\.11\\.mlp\\.up_proj"] == 5
    peft_model.merge_and_unload()
    assert not _adapters(model) and not hasattr(model, "peft_config")


def test_merged_weight_is_w_plus_scale_b_a_of_the_trained_adapter(monkeypatch):
    model = tiny_llama(num_hidden_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {}
    real_train = recovery.train_lora

    def train_then_snapshot(m, *a, **kw):
        real_train(m, *a, **kw)
        for name, mod in _adapters(m).items():
            trained[name] = (mod.get_base_layer().weight.detach().clone(), mod.lora_A["default"].weight.detach().clone(),
                             mod.lora_B["default"].weight.detach().clone(), mod.scaling["default"])

    monkeypatch.setattr(recovery, "train_lora", train_then_snapshot)
    recover(model, IDS, RANKS, steps=3, lr=1e-2, batch_size=2, device="cpu")
    assert set(model.state_dict()) == set(before)
    assert {n.rsplit(".", 2)[0] for n in trained} == {"model.layers.0", "model.layers.2"}
    for name, (w, a, b, scale) in trained.items():
        assert scale == 2.0 and a.shape[0] == RANKS[int(name.split(".")[2])] and a.dtype == torch.float32
        assert torch.equal(w, before[name + ".weight"])  # the base stays frozen while training
        assert b.abs().sum() > 0  # B starts at zero: the adapter did train
        torch.testing.assert_close(model.get_submodule(name).weight, w + scale * (b @ a), rtol=1.3e-6, atol=1e-7)
    for key, value in model.state_dict().items():
        if not key.startswith(("model.layers.0.", "model.layers.2.")) or key.endswith("norm.weight"):
            assert torch.equal(value, before[key]), key  # rank-0 layer, norms, embeddings untouched
    assert isinstance(decoder_layers(model)[1].mlp.up_proj, nn.Linear)


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone():
    def init_a(seed):
        model = tiny_llama()
        torch.manual_seed(123 + seed)  # whatever the global RNG, the seed decides
        state = torch.get_rng_state()
        peft_model = add_lora(model, [2, 2], seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        a = torch.cat([m.lora_A["default"].weight.flatten() for m in _adapters(model).values()])
        assert all(not m.lora_B["default"].weight.any() for m in _adapters(model).values())
        peft_model.merge_and_unload()
        return a

    assert torch.equal(init_a(0), init_a(0)) and not torch.equal(init_a(0), init_a(1))


def test_bf16_model_keeps_its_dtype_and_all_rank_zero_is_a_no_op():
    model = tiny_llama().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recover(model, IDS, [0, 0], steps=2, lr=1e-2, batch_size=2, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    recover(model, IDS, [2, 2], steps=2, lr=1e-2, batch_size=2, device="cpu")
    assert {v.dtype for v in model.state_dict().values()} == {torch.bfloat16}
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    assert all(p.requires_grad for p in model.parameters())

