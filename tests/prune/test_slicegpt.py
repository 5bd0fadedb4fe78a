"""SliceGPT: PCA bases, computational invariance, slicing, the sliced model type, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import TINY_VOCAB, run_cli, tiny_llama, tiny_model

import llmprune
from llmprune.api import PruneContext
from llmprune.errors import ConfigError
from llmprune.model.access import decoder_layers
from llmprune.prune.methods.slicegpt import SliceGPTConfig, slicegpt_prune
from llmprune.prune.methods.slicegpt_signals import joint_basis, xtx
from llmprune.prune.rotate import pca_basis, random_orthogonal, rotate_input, rotate_output, sliced_dim
from llmprune.sparsity import check_nm

IDS = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))


def _ctx(ids=IDS):
    return PruneContext(ids, torch.device("cpu"), batch_size=2, progress=False)


def _random_affine_norms(model, seed: int = 0) -> None:
    """Non-trivial norm scales (and LayerNorm shifts), so folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                         else torch.randn(p.shape, generator=g) * 0.1)


def _random_basis(seed: int = 0):
    calls = [seed]

    def basis(xs, k):
        calls[0] += 1
        return random_orthogonal(xs[0].shape[-1], calls[0])[:, :k]

    return basis


# --------------------------------------------------------------------------- pure tensor cores


def test_pca_basis_is_eigenvectors_of_xtx_hand_built():
    # rows spread 3 along e1 and 1 along e2, then rotated by 30 degrees: X^T X = R diag(18, 2) R^T
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)  # rows of x are mapped to x @ rot
    xr = x @ rot
    for damp in (0.0, 0.01):
        vals, q = pca_basis(xr.T @ xr, damp)
        torch.testing.assert_close(vals, torch.tensor([18.0, 2.0], dtype=torch.float64))
        torch.testing.assert_close(q[:, 0], rot[0])  # (c, s): each column's largest entry is positive
        torch.testing.assert_close(q[:, 1], rot[1])  # (-s, c)
        torch.testing.assert_close(q @ torch.diag(vals) @ q.T, xr.T @ xr)


def test_joint_basis_mixes_trace_normalized_moments_hand_built():
    # block inputs spread along e0 (X^T X = diag(100, 0, 0)), the head's inputs along e1 (diag(0, 2, 0)): after
    # normalizing each to trace 1 the mix is diag(1 - w, w, 0), so the top direction follows the larger weight
    xs = [torch.tensor([[10.0, 0.0, 0.0]])]
    head = torch.diag(torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))
    for w, top in ((0.2, 0), (0.8, 1)):
        q = joint_basis(xs, head, 1, w, 0.0)
        assert q.shape == (3, 1)
        torch.testing.assert_close(q[:, 0].abs(), torch.eye(3, dtype=torch.float64)[top])
    q = joint_basis(xs, head, 2, 0.3, 0.0)  # both kept, the e0 direction (0.7) first
    torch.testing.assert_close(q.abs(), torch.eye(3, dtype=torch.float64)[:, :2])
    torch.testing.assert_close(xtx(xs), torch.diag(torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)))


def test_rotation_and_slicing_of_linears():
    q = random_orthogonal(6, 3)
    w_in, w_out, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6)
    h, a = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close((h @ q) @ rotate_input(w_in, q).T, h @ w_in.T)  # reads the rotated residual
    w, bb = rotate_output(w_out, b, q)
    torch.testing.assert_close(a @ w.T + bb, (a @ w_out.T + b.double()) @ q)  # writes it
    assert rotate_input(w_in, q[:, :4]).shape == (5, 4) and rotate_output(w_out, b, q[:, :4])[0].shape == (4, 4)


def test_sliced_dim_rounding_and_errors():
    assert sliced_dim(576, 0.25, 8) == 432
    assert sliced_dim(576, 0.3, 8) == 400  # 403 rounded down
    assert sliced_dim(576, 0.0, 8) == 576
    assert sliced_dim(64, 0.25, 1) == 48
    with pytest.raises(ConfigError, match="leaves no dimension"):
        sliced_dim(64, 0.9, 8)


@pytest.mark.parametrize("kwargs,needle", [
    ({"sparsity": 1.0}, "strictly between 0 and 1"), ({"sparsity": "2:4"}, "not N:M"),
    ({"round_to": 0}, "round_to"), ({"pca": "fast"}, "pca"), ({"ignore": ["mlp"]}, "ignore"),
    ({"untie_embeddings": "yes"}, "untie_embeddings"), ({"head_weight": 1.5}, "head_weight"),
])
def test_bad_configs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        SliceGPTConfig(**kwargs)


# --------------------------------------------------------------------------- invariance and slicing


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_folding_and_random_rotation_keep_logits(arch):
    model = tiny_model(arch)
    _random_affine_norms(model)
    ref = model(IDS).logits
    for basis in (_random_basis(), None):  # random orthogonal Q per block, then PCA (slicing 0%: identity)
        m = copy.deepcopy(model)
        reports = slicegpt_prune(m, SliceGPTConfig(sparsity=0), _ctx(), basis=basis)
        assert all(r.sparsity == 0.0 for r in reports) and m.config.llmprune_sliced_dim == 64
        torch.testing.assert_close(m(IDS).logits, ref, atol=2e-5, rtol=1e-4)


def test_zero_slicing_of_tied_llama_keeps_it_tied_and_exact():
    model = tiny_llama(tie_word_embeddings=True)
    _random_affine_norms(model)
    ref = model(IDS).logits
    slicegpt_prune(model, SliceGPTConfig(sparsity=0), _ctx(), basis=_random_basis(5))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.model.norm.proj is not None
    torch.testing.assert_close(model(IDS).logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pca", ["sequential", "dense"])
def test_pca_slicing_beats_random_slicing(pca):
    # a model whose residual stream lives mostly in few directions: embeddings of rank 8 plus small noise
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    low = torch.randn(TINY_VOCAB, 8, generator=g) @ torch.randn(8, 64, generator=g)
    model.model.embed_tokens.weight.data.copy_(low + 0.01 * torch.randn(TINY_VOCAB, 64, generator=g))
    ref = model(IDS).logits
    errs = {}
    for name, basis in (("pca", None), ("random", _random_basis())):
        m = copy.deepcopy(model)
        slicegpt_prune(m, SliceGPTConfig(sparsity=0.5, pca=pca), _ctx(), basis=basis)
        errs[name] = (m(IDS).logits - ref).pow(2).mean().item()
    assert errs["pca"] < 0.5 * errs["random"], errs


def test_sliced_shapes_and_parameter_count():
    model = tiny_llama()
    before = sum(p.numel() for p in model.parameters())
    reports = slicegpt_prune(model, SliceGPTConfig(sparsity=0.25), _ctx())
    k = 48
    layer = decoder_layers(model)[0]
    assert layer.self_attn.q_proj.weight.shape == (64, k) and layer.self_attn.o_proj.weight.shape == (k, 64)
    assert layer.mlp.gate_proj.weight.shape == (128, k) and layer.mlp.down_proj.weight.shape == (k, 128)
    assert layer.shortcut.weight.shape == (k, k) and model.model.embed_tokens.weight.shape == (TINY_VOCAB, k)
    assert layer.attn_shortcut.weight.shape == (k, k)  # the MLP input has its own basis
    assert model.lm_head.weight.shape == (TINY_VOCAB, k)
    assert all(abs(r.sparsity - 0.25) < 1e-9 for r in reports) and len(reports) == 14
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(IDS).logits.isfinite().all()


# --------------------------------------------------------------------------- the sliced model type


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("opt", True), ("qwen2", False)])
def test_reload_round_trip(arch, tied, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie_word_embeddings=True) if (arch, tied) == ("llama", True) else tiny_model(arch)
    _random_affine_norms(model)
    slicegpt_prune(model, SliceGPTConfig(sparsity=0.25), _ctx())
    ref = model(IDS).logits
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == f"sliced_{arch}" and cfg["llmprune_sliced_dim"] == 48
    assert not list(tmp_path.glob("m/*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(IDS).logits, ref)
    torch.testing.assert_close(llmprune.load(tmp_path / "m")(IDS).logits, ref)
    copied = copy.deepcopy(loaded)  # hooks of the copy act on the copy's own modules
    decoder_layers(copied)[0].shortcut.weight.data.zero_()
    torch.testing.assert_close(loaded(IDS).logits, ref)
    out = loaded.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_bad_sliced_config_is_one_line_error(tmp_path):
    model = tiny_llama()
    slicegpt_prune(model, SliceGPTConfig(sparsity=0.25), _ctx())
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["llmprune_sliced_shortcuts"] = [True]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llmprune.LlmpruneError, match="llmprune_sliced_shortcuts"):
        llmprune.load(tmp_path / "m")
    cfg["llmprune_sliced_shortcuts"], cfg["llmprune_sliced_attn_shortcuts"] = [True, True], "yes"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llmprune.LlmpruneError, match="llmprune_sliced_attn_shortcuts"):
        llmprune.load(tmp_path / "m")


def test_single_basis_config_builds_without_attention_shortcuts():
    """A config without ``llmprune_sliced_attn_shortcuts`` (MLP input read in the block input's basis) still
    builds: no attention shortcut, and with identity MLP shortcuts the layer is a plain residual block."""
    from llmprune.model.sliced import build_sliced

    model = tiny_llama()
    cfg = copy.deepcopy(model.config)
    cfg.llmprune_sliced_dim, cfg.llmprune_sliced_shortcuts = 48, [True, True]
    cfg.llmprune_sliced_head_proj, cfg.llmprune_sliced_head_bias = False, False
    build_sliced(model, cfg)
    layer = decoder_layers(model)[0]
    assert getattr(layer, "attn_shortcut", None) is None and layer.shortcut.weight.shape == (48, 48)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for lay in decoder_layers(model):
        lay.shortcut.weight.data.copy_(torch.eye(48))
    h = torch.randn(2, 5, 48)
    pos = torch.arange(5).unsqueeze(0)
    emb = model.model.rotary_emb(h, pos)
    out = layer(h, position_embeddings=emb, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    layer._forward_hooks.clear()  # the same layer without the shortcut hook: h + attn + mlp
    plain = layer(h, position_embeddings=emb, attention_mask=None)
    torch.testing.assert_close(out, plain[0] if isinstance(plain, tuple) else plain)


def test_uniform_cfsp_after_slicing_reloads(tmp_path):
    from llmprune.prune.methods.cfsp import CFSPConfig

    model = tiny_llama()
    llmprune.prune(model, [SliceGPTConfig(sparsity=0.25), CFSPConfig(sparsity=0.25, allocation="uniform")], IDS,
                   device="cpu", batch_size=2, progress=False)
    ref = model(IDS).logits
    assert decoder_layers(model)[0].mlp.gate_proj.weight.shape == (96, 48)
    model.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(llmprune.load(tmp_path / "m")(IDS).logits, ref)


def test_slicing_twice_is_refused():
    model = tiny_llama()
    slicegpt_prune(model, SliceGPTConfig(sparsity=0.25), _ctx())
    with pytest.raises(llmprune.LlmpruneError, match="already sliced"):
        slicegpt_prune(model, SliceGPTConfig(sparsity=0.25), _ctx())


# --------------------------------------------------------------------------- CLI


def test_cli_slicegpt_then_wanda_24(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    common = ["--calib", tiny_calib_file, "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "-q"]
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "slicegpt", "--sparsity", 0.25,
                           "-o", tmp_path / "s", *common)
    assert code == 0, err
    model = llmprune.load(tmp_path / "s")
    assert model.config.llmprune_sliced_dim == 48 and model(IDS).logits.isfinite().all()
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--recipe", "recipes/slicegpt-25-wanda-2of4.yaml",
                           "-o", tmp_path / "sw", *common)
    assert code == 0, err
    model = llmprune.load(tmp_path / "sw")
    meta = json.loads((tmp_path / "sw" / "llmprune.json").read_text())
    assert [s["method"] for s in meta["recipe"]["prune"]] == ["slicegpt", "wanda"]
    from llmprune.publish.modelcard import build_card

    assert "residual stream (embedding dimension) is 48 of the base model's 64" in build_card(tmp_path / "sw")
    for layer in decoder_layers(model):
        assert layer.self_attn.q_proj.in_features == 48
        assert check_nm(layer.self_attn.q_proj.weight != 0, 2, 4) and check_nm(layer.mlp.down_proj.weight != 0, 2, 4)
    assert model(IDS).logits.isfinite().all()


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", "1"], "strictly between 0 and 1"),
    (["--sparsity", "0.95", "--round-to", "8"], "leaves no dimension"),
    (["--sparsity", "2:4"], "not N:M"),
])
def test_cli_bad_slicegpt_inputs(tiny_model_dir, tiny_calib_file, tmp_path, capsys, args, needle):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "slicegpt", *args, "--calib",
                           tiny_calib_file, "--nsamples", 2, "--seqlen", 16, "-o", tmp_path / "x", "--device", "cpu",
                           "-q")
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("llmprune: error:")
    assert not (tmp_path / "x").exists()
