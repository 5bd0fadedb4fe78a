"""Packed 2:4 format: pack/unpack, Sparse24Linear, the "packed" checkpoint format, convert, CLI checks."""

import json
import math

import llmprune.kernels.sparse24_linear as kmod
import pytest
import torch
from helpers import TINY_VOCAB, tiny_llama, tiny_tokenizer
from safetensors import safe_open
from torch import nn

import llmprune
from llmprune import Sparse24Linear, pack_24, unpack_24
from llmprune.cli import main
from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import save_checkpoint
from llmprune.sparsity import nm_mask


def sparse_weight(out, inp, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w = w * nm_mask(w.abs(), 2, 4)
    w[0, :4] = 0  # an empty group
    w[out // 2, :4] = torch.tensor([0.0, 0.0, 0.0, 2.0])  # a group with one non-zero
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4), (48, 200), (7, 36), (5, 1028), (3, 64)])
def test_pack_unpack_exact(shape, dtype):
    w = sparse_weight(*shape, dtype=dtype)
    values, meta = pack_24(w)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], math.ceil(shape[1] / 32)) and meta.dtype == torch.int32
    assert torch.equal(unpack_24(values, meta), w)


def test_layout_is_the_documented_one():
    # Row: group 0 keeps columns 1 and 3, group 1 keeps column 4 only (plus the lowest free position, 5).
    w = torch.zeros(1, 40)
    w[0, 1], w[0, 3], w[0, 4] = 1.0, 2.0, 3.0
    w[0, 39] = 4.0  # group 9, slot 1, position 3 -> value 19 -> word 1, bits 6..7
    values, meta = pack_24(w)
    assert values[0, :4].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert values[0, 19].item() == 4.0
    word0 = meta[0, 0].item() & 0xFFFFFFFF
    assert [(word0 >> (2 * j)) & 3 for j in range(4)] == [1, 3, 0, 1]
    assert (meta[0, 1].item() >> 6) & 3 == 3


def test_pack_refuses_non_24():
    w = sparse_weight(8, 16)
    w[3, 8:12] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 3, columns 8..11 hold 4 non-zeros"):
        pack_24(w)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        pack_24(torch.zeros(2, 6))


def test_sparse24_linear_module():
    lin = nn.Linear(64, 24)
    lin.weight.data = sparse_weight(24, 64)
    mod = Sparse24Linear.from_linear(lin)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(mod(x), lin(x))
    back = mod.to_linear()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert {k for k, _ in mod.state_dict().items()} == {"values", "meta", "bias"}
    mod.half()  # values cast with the module, metadata stays int32
    assert mod.values.dtype == torch.float16 and mod.meta.dtype == torch.int32
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Linear.from_linear(nn.Linear(8, 4))


# ---------------------------------------------------------------------- checkpoints


def linear_bytes(directory):
    total = 0
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".layers." in key and key.rsplit(".", 1)[1] in ("weight", "values", "meta") and "proj" in key:
                t = f.get_slice(key)
                total += math.prod(t.get_shape()) * (4 if t.get_dtype() in ("F32", "I32") else 2)
    return total


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory):
    """A tiny bf16 Llama pruned 2:4 (mlp.down_proj left dense), saved dense and packed."""
    tmp = tmp_path_factory.mktemp("s24")
    model = tiny_llama().to(torch.bfloat16)
    llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4", ignore=("mlp.down_proj",)), device="cpu",
                   progress=False)
    tok = tiny_tokenizer()
    dense = save_checkpoint(model, tok, tmp / "dense", metadata={}, format="dense")
    packed = save_checkpoint(model, tok, tmp / "packed", metadata={}, format="packed")
    return dense, packed


def test_packed_checkpoint_round_trip(pruned_pair, monkeypatch):
    dense_dir, packed_dir = pruned_pair
    cfg = json.loads((packed_dir / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmprune_sparse24" and len(cfg["modules"]) == 2 * 6  # down_proj stays dense
    assert all("down_proj" not in m for m in cfg["modules"])
    with safe_open(str(packed_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.values" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    assert "model.layers.0.mlp.down_proj.weight" in keys and "lm_head.weight" in keys

    def no_unpack(*a, **k):
        raise AssertionError("loading must not unpack to dense")

    monkeypatch.setattr("llmprune.runtime.sparse24.module.unpack_24", no_unpack)
    packed = llmprune.load(packed_dir)
    monkeypatch.undo()
    dense = llmprune.load(dense_dir)
    assert isinstance(packed.model.layers[1].self_attn.q_proj, Sparse24Linear)
    assert isinstance(packed.model.layers[1].mlp.down_proj, nn.Linear)
    assert packed.dtype == torch.bfloat16
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=0, atol=0)


def test_packed_linears_are_smaller(pruned_pair):
    dense_dir, packed_dir = pruned_pair
    # down_proj is dense in both, so compare the pruned linears only: 12 of 14 packed.
    d, p = linear_bytes(dense_dir), linear_bytes(packed_dir)
    down = 2 * 64 * 128 * 2  # two dense down_proj, bf16
    assert (p - down) / (d - down) <= 0.5625 + 1e-9


def test_plain_transformers_loads_packed_after_import(pruned_pair):
    from transformers import AutoModelForCausalLM

    dense_dir, packed_dir = pruned_pair
    model = AutoModelForCausalLM.from_pretrained(packed_dir).eval()
    assert isinstance(model.model.layers[0].mlp.gate_proj, Sparse24Linear)
    ids = torch.randint(0, TINY_VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llmprune.load(dense_dir)(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_generation_matches_dense_twin(pruned_pair, backend, monkeypatch):
    dense_dir, packed_dir = pruned_pair
    packed, dense = llmprune.load(packed_dir), llmprune.load(dense_dir)
    monkeypatch.setattr(Sparse24Linear, "backend", backend)  # triton: the kernel (interpreter on CPU)
    calls = []
    real = kmod.sparse24_linear
    monkeypatch.setattr(kmod, "sparse24_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    kw = dict(max_new_tokens=8 if backend == "triton" else 12, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        assert packed.generate(ids, **kw).tolist() == dense.generate(ids, **kw).tolist()
    # every decode-step linear (one row) goes through the kernel; the 6-token prefill too (<= 16 rows)
    assert bool(calls) == (backend == "triton")


def test_convert_round_trip(pruned_pair, tmp_path, capsys):
    dense_dir, packed_dir = pruned_pair
    assert main(["convert", str(packed_dir), "--format", "dense", "-o", str(tmp_path / "d"), "-q"]) == 0
    assert main(["convert", str(tmp_path / "d"), "--format", "packed", "-o", str(tmp_path / "p"), "-q"]) == 0
    a = (packed_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "p" / "model.safetensors").read_bytes() == a
    meta = json.loads((tmp_path / "p" / "llmprune.json").read_text())
    assert meta["format"] == "packed" and meta["converted_from"] == "dense"
    # the dense conversion is a plain HF checkpoint again
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in cfg
    capsys.readouterr()


def test_convert_refuses_non_24(tiny_model_dir, tmp_path, capsys):
    code = main(["convert", str(tiny_model_dir), "--format", "packed", "-o", str(tmp_path / "p")])
    assert code == 2
    assert "no 2:4-sparse linear" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_compress_packed_rejects_non_24_before_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model loaded before the format check")

    monkeypatch.setattr("llmprune.api.load_pretrained", boom)
    code = main(["compress", str(tiny_model_dir), "--sparsity", "0.5", "--format", "packed", "-o",
                 str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "sparsity 0.5 is not 2:4" in err
    assert not (tmp_path / "x").exists()


def test_compress_packed_cli(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "w"
    code = main(["compress", str(tiny_model_dir), "--method", "wanda", "--sparsity", "2:4", "--calib",
                 str(tiny_calib_file), "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--format",
                 "packed", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "llmprune.json").read_text())["format"] == "packed"
    model = llmprune.load(out)
    assert sum(isinstance(m, Sparse24Linear) for m in model.modules()) == 14


def test_load_errors(pruned_pair, tmp_path):
    from llmprune.runtime.sparse24 import load_packed

    _, packed_dir = pruned_pair
    with pytest.raises(LlmpruneError, match="not a packed 2:4 checkpoint"):
        load_packed(pruned_pair[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in packed_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["quantization_config"]["modules"].append("model.layers.0.mlp.nope")
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmpruneError, match="does not have"):
        load_packed(broken)


@pytest.mark.real_model
def test_real_smollm2_packed_size_and_logits(tmp_path):
    model = llmprune.load("smollm2-135m", dtype="bfloat16")
    llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), device="cpu", progress=False)
    packed_dir = save_checkpoint(model, None, tmp_path / "packed", metadata={}, format="packed")
    dense_bytes = 30 * 2 * (576 * (576 + 2 * 192 + 576) + 3 * 576 * 1536)  # the 210 linears in bf16
    assert linear_bytes(packed_dir) / dense_bytes <= 0.57
    packed = llmprune.load(packed_dir)
    assert sum(isinstance(m, Sparse24Linear) for m in packed.modules()) == 210
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=0, atol=0)
