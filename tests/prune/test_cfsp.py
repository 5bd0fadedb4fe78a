"""CFSP structured pruning: pure cores on hand-built tensors, physical removal, allocation, reload, CLI."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import TINY_VOCAB, run_cli, tiny_llama

import llmprune
from llmprune.calibration.blockstats import angular_distance
from llmprune.errors import ConfigError
from llmprune.model.access import decoder_layers, kv_heads
from llmprune.model.structured import is_nonuniform, layer_sizes, sync_config
from llmprune.prune.allocation import allocate_budget, allocate_with_groups, layer_ratios, round_sizes
from llmprune.prune.methods.cfsp import CFSPConfig, channel_scores, head_group_scores
from llmprune.prune.recovery import cosine_lr, lora_ranks, recover
from llmprune.prune.structured import group_rows, prune_head_groups, prune_mlp_channels
from llmprune.sparsity import top_indices

IDS = torch.randint(0, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- pure cores


def test_channel_scores_and_choice_on_hand_built_layer():
    # 4 channels, hidden 2. Channel 2 has the largest weights, channel 0 the smallest activations.
    w_gate = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 3.0], [0.5, 0.5]])
    w_up = w_gate.clone()
    w_down = torch.tensor([[1.0, 1.0, 2.0, 1.0], [0.0, 1.0, 2.0, 1.0]])
    x_sq = torch.tensor([4.0, 1.0])  # ||x|| = [2, 1]
    h_sq = torch.tensor([0.0, 1.0, 1.0, 4.0])  # ||h|| = [0, 1, 1, 2]
    s = channel_scores(w_gate, w_up, w_down, x_sq, h_sq)
    gate = torch.tensor([2.0, 3.0, 9.0, 1.5])
    down = torch.tensor([0.0, 2.0, 4.0, 4.0])
    expected = 2 * gate / gate.sum() + down / down.sum()
    torch.testing.assert_close(s, expected)
    assert top_indices(s, 2).tolist() == [2, 3]
    assert top_indices(s, 3).tolist() == [1, 2, 3]


def test_head_group_scores_hand_built():
    # 2 KV groups, 2 query heads per group, head_dim 1, hidden 2
    x_sq = torch.tensor([1.0, 1.0])
    w_q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    w_k = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    w_v = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    w_o = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    o_sq = torch.tensor([1.0, 1.0, 1.0, 1.0])
    s = head_group_scores(w_q, w_k, w_v, w_o, x_sq, o_sq, 2)
    expected = torch.tensor([2 / 12 + 1 / 4 + 1 / 4 + 2 / 4, 10 / 12 + 3 / 4 + 3 / 4 + 2 / 4])
    torch.testing.assert_close(s, expected)
    assert top_indices(s, 1).tolist() == [1]


def test_angular_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    torch.testing.assert_close(angular_distance(a, b), torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("round_to", [1, 8, 64])
def test_allocation_invariants(ratio, round_to):
    imp = [0.30, 0.05, 0.10, 0.02, 0.20, 0.08]
    sizes = [1536] * 6
    lo, hi = 0.05, 0.8
    ratios = layer_ratios(imp, ratio, lo, hi, [float(s) for s in sizes])
    assert sum(r * s for r, s in zip(ratios, sizes)) == pytest.approx(ratio * sum(sizes), rel=1e-9)
    assert all(lo - 1e-12 <= r <= hi + 1e-12 for r in ratios)
    # less important (smaller angular distance) layers are pruned more
    order = sorted(range(6), key=lambda i: imp[i])
    assert [ratios[i] for i in order] == sorted(ratios, reverse=True)
    kept = allocate_budget(imp, ratio, lo, hi, round_to, sizes)
    assert all(k % round_to == 0 or k == s for k, s in zip(kept, sizes))
    removed = sum(sizes) - sum(kept)
    assert abs(removed - ratio * sum(sizes)) <= round_to / 2 + 1e-9
    for k, s, r in zip(kept, sizes, ratios):  # each layer within one rounding step of its clamped ratio
        assert abs((s - k) - r * s) <= round_to + 1e-9
        assert lo * s - round_to <= s - k <= hi * s + round_to


def test_uniform_allocation_and_lora_ranks():
    assert allocate_budget(None, 0.25, 0.0, 0.8, 8, [128, 128, 128]) == [96, 96, 96]
    assert layer_ratios(None, 0.3, 0.0, 0.8, [1.0, 2.0]) == [0.3, 0.3]
    assert lora_ranks([0.1, 0.3], 8) == [4, 12]


def test_allocation_with_head_groups():
    # Two layers of 16 one-parameter channels + 4 groups of 4 parameters (32 each); half of it goes:
    # whole groups first (2 of 4 = 8 parameters), the channels absorb the other 8.
    assert allocate_with_groups(None, 0.5, 0.0, 0.8, 1, [16, 16], 1, [4, 4], [4, 4]) == ([8, 8], [2, 2])
    # The more important layer 1 keeps more: channels and groups.
    kept, groups = allocate_with_groups([0.1, 0.3], 0.5, 0.0, 0.9, 1, [16, 16], 1, [4, 4], [4, 4])
    assert kept[1] > kept[0] and groups[1] > groups[0]
    removed = sum(16 - k for k in kept) + sum((4 - g) * 4 for g in groups)
    assert abs(removed - 32) <= 1  # the budget holds in total
    with pytest.raises(ConfigError, match="every attention head group"):
        allocate_with_groups(None, 0.9, 0.0, 0.95, 1, [16, 16], 1, [1, 1], [4, 4])


def test_empty_layer_and_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="layer 1 would be empty"):
        round_sizes([0.1, 0.99], [64, 64], 8)
    with pytest.raises(ConfigError, match="not N:M"):
        CFSPConfig(sparsity="2:4")
    with pytest.raises(ConfigError, match=r"\[min_ratio, max_ratio\]"):
        CFSPConfig(sparsity=0.9)
    with pytest.raises(ConfigError, match="allocation"):
        CFSPConfig(sparsity=0.3, allocation="random")
    with pytest.raises(ConfigError, match="round_to"):
        CFSPConfig(sparsity=0.3, round_to=0)
    # sparsity so high that a layer of the real model would be emptied
    model = tiny_llama(intermediate_size=16)
    cfg = CFSPConfig(sparsity=0.95, max_ratio=0.99, allocation="uniform", round_to=8)
    with pytest.raises(llmprune.LlmpruneError, match="would be empty"):
        llmprune.prune(model, cfg, IDS, device="cpu", progress=False)


# --------------------------------------------------------------------------- physical removal


def _zeroed_copy(model, keep_ch, keep_groups=None):
    """Same model with the dropped channels / head groups zeroed (down/o columns)."""
    ref = tiny_llama().double()
    ref.load_state_dict(model.state_dict())
    for i, layer in enumerate(decoder_layers(ref)):
        drop = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
        drop[keep_ch[i]] = False
        layer.mlp.down_proj.weight.data[:, drop] = 0
        if keep_groups is not None:
            attn = layer.self_attn
            per = attn.o_proj.in_features // kv_heads(layer)
            drop = torch.ones(attn.o_proj.in_features, dtype=torch.bool)
            drop[group_rows(keep_groups[i], per)] = False
            attn.o_proj.weight.data[:, drop] = 0
    return ref


@pytest.mark.parametrize("heads", [False, True])
def test_removal_preserves_function_on_kept_channels(heads):
    model = tiny_llama().double()
    keep_ch = [torch.tensor([0, 5, 6, 40, 77, 100, 127]), torch.arange(0, 128, 3)]
    keep_groups = [torch.tensor([1]), torch.tensor([0, 1])] if heads else None
    ref = _zeroed_copy(model, keep_ch, keep_groups)
    for i, layer in enumerate(decoder_layers(model)):
        prune_mlp_channels(layer, keep_ch[i])
        if heads:
            prune_head_groups(layer, keep_groups[i])
    sync_config(model)
    assert layer_sizes(model) == ([7, 43], [1, 2] if heads else [2, 2])
    assert model.config.model_type == "llmprune_llama"
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-10, atol=1e-10)
    # generation with the KV cache works on the smaller model
    out = model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 9)


def _cfsp(model, **kw):
    cfg = CFSPConfig(**{"sparsity": 0.25, "round_to": 8, **kw})
    return llmprune.prune(model, cfg, IDS, device="cpu", batch_size=2, progress=False)


def test_cfsp_sizes_match_allocation_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_hidden_layers=4)
    with torch.no_grad():  # layer 1 barely changes the residual stream: it should be pruned most
        decoder_layers(model)[1].mlp.down_proj.weight.mul_(0.05)
        decoder_layers(model)[1].self_attn.o_proj.weight.mul_(0.05)
    report = _cfsp(model, max_ratio=0.6)
    sizes, kv = layer_sizes(model)
    assert kv == [2] * 4 and all(s % 8 == 0 for s in sizes)
    assert sum(128 - s for s in sizes) == pytest.approx(0.25 * 4 * 128, abs=4)
    assert sizes[1] == min(sizes) < max(sizes)
    assert report.overall_sparsity == pytest.approx(1 - sum(sizes) / (4 * 128))
    assert model.config.llmprune_intermediate_sizes == sizes
    ref = model(IDS).logits
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert layer_sizes(loaded) == (sizes, kv)
    torch.testing.assert_close(loaded(IDS).logits, ref)
    torch.testing.assert_close(llmprune.load(tmp_path / "m")(IDS).logits, ref)


def test_uniform_allocation_loads_in_plain_transformers(tmp_path):
    model = tiny_llama()
    _cfsp(model, allocation="uniform", prune_heads=True, sparsity=0.5)
    assert model.config.model_type == "llama"
    assert model.config.intermediate_size == layer_sizes(model)[0][0] < 128
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    ref = model(IDS).logits
    model.save_pretrained(tmp_path / "u")
    torch.save(IDS, tmp_path / "ids.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'u')!r});"
        f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)).logits, {str(tmp_path / 'out.pt')!r});"
        "assert 'llmprune' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), ref)


def test_ignored_layer_is_left_whole():
    model = tiny_llama(num_hidden_layers=3)
    _cfsp(model, ignore=["*.0.mlp.down_proj"], prune_heads=True, sparsity=0.3)
    sizes, kv = layer_sizes(model)
    assert sizes[0] == 128 and kv[0] == 2 and sum(sizes) < 3 * 128


def test_prune_heads_budget_counts_attention():
    model = tiny_llama(num_hidden_layers=4)
    dense = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters() if p.dim() == 2)
    report = _cfsp(model, prune_heads=True, sparsity=0.4, max_ratio=0.7)
    after = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters() if p.dim() == 2)
    assert 1 - after / dense == pytest.approx(0.4, abs=0.03)
    assert report.overall_sparsity == pytest.approx(1 - after / dense)
    assert min(layer_sizes(model)[1]) >= 1
    assert model(IDS).logits.isfinite().all()


def test_recovery_runs_and_merges():
    model = tiny_llama()
    before_keys = set(model.state_dict())
    _cfsp(model, recover_steps=3, recover_batch_size=2, recover_lr=1e-2)
    assert set(model.state_dict()) == before_keys  # LoRA merged and removed
    assert all(p.requires_grad for p in model.parameters())
    assert model(IDS).logits.isfinite().all()


def test_recovery_lowers_calibration_loss_with_cosine_schedule():
    assert [cosine_lr(1.0, s, 4) for s in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        before = float(model(input_ids=IDS, labels=IDS).loss)
    w_before = decoder_layers(model)[0].mlp.down_proj.weight.clone()
    recover(model, IDS, [4] * len(decoder_layers(model)), steps=20, lr=1e-2, batch_size=4, device="cpu")
    with torch.no_grad():
        after = float(model(input_ids=IDS, labels=IDS).loss)
    assert after < before - 0.1, (before, after)  # the merged adapters learned the calibration text
    assert not torch.equal(decoder_layers(model)[0].mlp.down_proj.weight, w_before)


# --------------------------------------------------------------------------- CLI


def test_cli_cfsp_and_combined_recipe(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    common = ["--calib", tiny_calib_file, "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "-q"]
    code, out, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "cfsp", "--sparsity", 0.3,
                             "--prune-heads", "--max-ratio", 0.6, "--round-to", 8, "-o", tmp_path / "c", *common)
    assert code == 0, err
    meta = json.loads((tmp_path / "c" / "llmprune.json").read_text())
    assert meta["recipe"]["prune"][0]["prune_heads"] is True and meta["recipe"]["prune"][0]["max_ratio"] == 0.6
    model = llmprune.load(tmp_path / "c")
    assert "saved structured checkpoint" in out or meta["format"] == "dense"
    assert meta["format"] == ("structured" if is_nonuniform(model) else "dense")
    assert model(IDS).logits.isfinite().all()

    code, out, err = run_cli(capsys, "compress", tiny_model_dir, "--recipe", "recipes/cfsp-20-wanda-2of4.yaml",
                             "-o", tmp_path / "cw", *common)
    assert code == 0, err
    model = llmprune.load(tmp_path / "cw")
    sizes = layer_sizes(model)[0]
    assert sum(sizes) < 2 * 128
    from llmprune.sparsity import check_nm

    for layer in decoder_layers(model):
        assert check_nm(layer.mlp.down_proj.weight != 0, 2, 4)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "wanda", "--prune-heads"], "--prune-heads does not apply to method 'wanda'"),
        (["--method", "cfsp", "--sparsity", "2:4"], "not N:M"),
        (["--method", "cfsp", "--sparsity", "0.5", "--max-ratio", "0.4"], "max_ratio"),
    ],
)
def test_cli_bad_cfsp_flags(tiny_model_dir, tmp_path, capsys, args, needle):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, *args, "-o", tmp_path / "x", "--device", "cpu", "-q")
    assert code == 2 and needle in err
    assert not (tmp_path / "x").exists()
