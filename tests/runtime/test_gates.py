"""Learned attention gates: pooling, ground truth, training, selection, gated attention, save/load, CLI."""

import json
import math

import pytest
import torch
from helpers import tiny_llama

import llmprune
from llmprune.cli import main
from llmprune.formats.gates_meta import GATES_FILE
from llmprune.runtime.gates.files import load_gates, save_gates
from llmprune.runtime.gates.gate import (
    AttnGate,
    GateConfig,
    block_ground_truth,
    pool_blocks,
    pool_k,
    pool_q,
    select_blocks,
)
from llmprune.runtime.gates.runtime import attach_gates, detach_gates, gate_runtime
from llmprune.runtime.gates.training import train_gates
from llmprune.runtime.options import runtime_setup

BS = 16


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama (GQA 2) and gates trained for a few steps on random tokens."""
    model = tiny_llama(max_position_embeddings=512)
    cfg = GateConfig.for_model(model, block_size=BS, gate_dim=16)
    calib = torch.randint(3, 128, (6, 96), generator=torch.Generator().manual_seed(0))
    gates, report = train_gates(model, calib, cfg, steps=25, lr=3e-3, progress=False)
    return model, gates, report


def test_pooling_values():
    x = torch.arange(10, dtype=torch.float32).view(1, 1, 5, 2)  # tokens [0,1],[2,3],[4,5],[6,7],[8,9]
    p = pool_blocks(x, 2, ("avg", "max", "min"))
    assert p.shape == (1, 1, 3, 6)
    assert p[0, 0, 0].tolist() == [1, 2, 2, 3, 0, 1]
    assert p[0, 0, 2].tolist() == [8, 9, 8, 9, 8, 9]  # partial last block: its single token
    k = torch.randn(2, 3, 37, 8)
    pk = pool_k(k, 16)
    assert pk.shape == (2, 3, 3, 24)
    torch.testing.assert_close(pk[:, :, 1, :8], k[:, :, 16:32].amax(2))
    torch.testing.assert_close(pk[:, :, 2, 16:], k[:, :, 32:].mean(2))
    q = torch.randn(2, 6, 37, 8)  # 6 q heads, 3 KV heads -> groups of 2, concatenated
    pq = pool_q(q, 16, 3)
    assert pq.shape == (2, 3, 3, 16)
    torch.testing.assert_close(pq[:, 1, 0, 8:], q[:, 3, :16].mean(1))


def brute_force_gt(q, k, scaling, bs):
    b, hq, s, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scaling
    p = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf")).softmax(-1)
    nb = -(-s // bs)
    out = torch.zeros(b, hkv, nb, nb)
    for h in range(hkv):
        for i in range(nb):
            for j in range(nb):
                tile = p[:, h * g : (h + 1) * g, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]
                out[:, h, i, j] = tile.amax(dim=(1, 2, 3))
    return out / out.sum(-1, keepdim=True)


def test_ground_truth_brute_force_and_chunking():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 37, 8, generator=g), torch.randn(2, 2, 37, 8, generator=g)
    gt = block_ground_truth(q, k, 0.5, BS, chunk_blocks=100)
    torch.testing.assert_close(gt, brute_force_gt(q, k, 0.5, BS))
    torch.testing.assert_close(block_ground_truth(q, k, 0.5, BS, chunk_blocks=1), gt)
    assert torch.all(gt.triu(1) == 0) and torch.allclose(gt.sum(-1), torch.ones(2, 2, 3))


def test_training_reduces_kl(trained):
    _, gates, report = trained
    assert len(gates) == 2
    assert all(after < 0.8 * before for before, after in zip(report.kl_init, report.kl_final)), report.table()


def test_selection_budget_and_forced_blocks():
    g = torch.Generator().manual_seed(0)
    nb = 12
    qpos = torch.arange(nb)
    logp = torch.randn(3, nb, nb, generator=g).masked_fill(torch.ones(nb, nb).triu(1).bool(), float("-inf"))
    logp[:, :, 0] = -50.0  # the gate dislikes the first block: still kept
    for s in (0.0, 0.5, 0.9):
        keep = select_blocks(logp, qpos, sparsity=s, block_size=BS)
        n = qpos + 1
        expect = torch.maximum(torch.ceil((1 - s) * n - 1e-9), n.clamp_max(2))
        assert keep.sum(-1).eq(expect.long()).all()
        assert keep[:, :, 0].all() and keep.diagonal(dim1=-2, dim2=-1).all()
        assert not (keep & torch.ones(nb, nb).triu(1).bool()).any()  # never a future block
    keep = select_blocks(logp, qpos, budget=3 * BS, block_size=BS)
    assert keep.sum(-1).eq(torch.clamp(qpos + 1, max=3)).all()
    keep = select_blocks(logp, qpos, threshold=1e9, block_size=BS)  # nothing passes: first + own only
    assert keep.sum(-1).eq((qpos + 1).clamp_max(2)).all()


def test_sparsity_zero_is_dense_and_keep_all_matches(trained):
    model, gates, _ = trained
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(1))
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(ids).logits
        rt = attach_gates(model, gates, attn_sparsity=0.0)
        try:
            assert set(model.state_dict()) == keys  # gates are not submodules: save_pretrained is unchanged
            assert torch.equal(model(ids).logits, ref)  # identical: plain sdpa
            rt.threshold = 0.0  # every block passes: the masked path must equal dense attention
            rt.measure_recall = True
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
            assert rt.recall == pytest.approx(1.0, abs=1e-5) and rt.achieved_sparsity == 0.0
            rt.threshold, rt.sparsity = None, 0.9
            rt.reset_stats()
            assert not torch.allclose(model(ids).logits, ref, atol=1e-3)
            assert 0.0 < rt.recall < 1.0 and rt.achieved_sparsity > 0.2
        finally:
            detach_gates(model)
    assert model.config._attn_implementation == "sdpa" and gate_runtime(model) is None


def test_decode_state_and_kernel_path(trained):
    model, gates, _ = trained
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    attach_gates(model, gates, attn_sparsity=0.5)
    try:
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=2)
        st = gates[0].state
        assert st.length == 69 and st.kdone.shape[2] == 69 // BS and st.ktail.shape[2] == 69 % BS
        # the incrementally pooled gate keys equal those of one prefill over the whole sequence
        kdone = st.kdone.clone()
        model(out[:, :69])
        torch.testing.assert_close(gates[0].state.kdone, kdone, atol=1e-4, rtol=1e-4)
        # one decode step: Triton kernel (interpreter on CPU) vs the masked SDPA path, bf16
        model.to(torch.bfloat16)
        logits = {}
        for use_kernel in (False, True):
            gate_runtime(model).use_kernel = use_kernel
            res = model(out[:, :68], use_cache=True)
            step = model(out[:, 68:69], past_key_values=res.past_key_values, use_cache=True)
            logits[use_kernel] = step.logits.float()
        torch.testing.assert_close(logits[True], logits[False], atol=3e-2, rtol=3e-2)
    finally:
        model.to(torch.float32)
        detach_gates(model)


def test_save_load_round_trip(trained, tmp_path, tiny_model_dir):
    _, gates, _ = trained
    save_gates(gates, tmp_path / "g", {"base_model": str(tiny_model_dir), "attn_sparsity": 0.9})
    loaded, meta = load_gates(tmp_path / "g")
    assert meta["attn_sparsity"] == 0.9 and meta["gate_config"]["block_size"] == BS
    for a, b in zip(gates, loaded):
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
    assert (tmp_path / "g" / GATES_FILE).stat().st_size < 200_000
    model = llmprune.load(tmp_path / "g")  # gates-only directory: base model + gates attached
    rt = gate_runtime(model)
    assert rt is not None and rt.sparsity == 0.9
    with pytest.raises(llmprune.LlmpruneError, match="different shape"):
        attach_gates(tiny_llama(num_hidden_layers=3), tmp_path / "g")
    assert isinstance(loaded[0], AttnGate) and not math.isnan(float(loaded[0].q_proj.sum()))


def test_load_with_runtime_options_attaches_and_configures_gates(trained, tmp_path, tiny_model_dir):
    _, gates, _ = trained
    save_gates(gates, tmp_path / "g", {"base_model": str(tiny_model_dir), "attn_sparsity": 0.9})
    model = llmprune.load(tmp_path / "g", runtime=llmprune.RuntimeConfig(attn_sparsity=0.25))
    assert gate_runtime(model).sparsity == 0.25
    assert runtime_setup(model).features == ["attention gates, 25% of KV blocks skipped"]
    model = llmprune.load(tiny_model_dir, runtime=llmprune.RuntimeConfig(gates=str(tmp_path / "g")))
    assert gate_runtime(model).sparsity == 0.9  # the sparsity recorded with the gates
    assert gate_runtime(llmprune.load(tmp_path / "g", gates=False)) is None
    with pytest.raises(llmprune.ConfigError, match="needs attention gates"):
        llmprune.load(tiny_model_dir, runtime=llmprune.RuntimeConfig(attn_sparsity=0.5))


def test_cli_train_gates_and_ppl(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "gates"
    argv = ["train-gates", str(tiny_model_dir), "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "64",
            "--block-size", "16", "--gate-dim", "8", "--steps", "3", "-o", str(out), "-q"]
    assert main(argv) == 0
    meta = json.loads((out / "attn_gates.json").read_text())
    assert len(meta["kl_final"]) == 2 and meta["base_model"] == str(tiny_model_dir.resolve())
    assert main(argv) == 2  # exists, no --overwrite
    data = tmp_path / "wiki.txt"
    data.write_text(" ".join(f"w{i % 100}" for i in range(600)))
    assert main(["ppl", str(out), "--data-path", str(data), "--seqlen", "128", "--attn-sparsity", "0.5", "-q"]) == 0
    assert "gate recall" in capsys.readouterr().out
    assert main(["ppl", str(tiny_model_dir), "--data-path", str(data), "--seqlen", "128", "--attn-sparsity", "0.5"]) == 2


# ----------------------------------------------------------------- bad attn_gates.json / gate weights


def _saved(trained, directory, tiny_model_dir):
    _, gates, _ = trained
    save_gates(gates, directory, {"base_model": str(tiny_model_dir), "attn_sparsity": 0.5})
    return directory


BAD_META = [
    ("attn_sparsity", 1.5, "attn_sparsity must be a number in [0, 1)"),
    ("attn_sparsity", "half", "attn_sparsity must be a number in [0, 1)"),
    ("gate_config.block_size", 48, "gate_config.block_size must be a power of two >= 16"),
    ("gate_config.block_size", 8, "gate_config.block_size must be an integer >= 16"),
    ("gate_config.num_layers", 0, "gate_config.num_layers must be an integer >= 1"),
    ("gate_config.num_layers", "2", "gate_config.num_layers must be an integer >= 1"),
    ("gate_config.num_heads", 3, "gate_config.num_heads (3) is not a multiple of gate_config.num_kv_heads"),
    ("gate_config.head_dim", 15, "gate_config.head_dim must be even"),
    ("gate_config.gate_dim", 0, "gate_config.gate_dim must be an integer >= 2"),
    ("gate_config.rope_base", -1.0, "gate_config.rope_base must be a positive number"),
    ("gate_config.blocksize", 64, "gate_config.blocksize: unknown key"),
    ("gate_config.num_heads", None, "gate_config.num_heads: missing"),
    ("gate_config", None, "gate_config: missing or not an object"),
    ("gate_config", [1, 2], "gate_config: missing or not an object"),
    ("gate_config.num_layers", 3, "tensor 'layers.2.q_proj' is missing"),  # file and weights disagree
    ("gate_config.gate_dim", 8, "tensor 'layers.0.q_proj' has shape"),
]


@pytest.mark.parametrize("key,value,needle", BAD_META, ids=[f"{k}={v!r}" for k, v, _ in BAD_META])
def test_bad_gates_json_names_file_and_key(key, value, needle, trained, tmp_path, tiny_model_dir):
    d = _saved(trained, tmp_path / "g", tiny_model_dir)
    meta = json.loads((d / "attn_gates.json").read_text())
    *parents, last = key.split(".")
    target = meta
    for p in parents:
        target = target[p]
    if value is None:
        del target[last]
    else:
        target[last] = value
    (d / "attn_gates.json").write_text(json.dumps(meta))
    with pytest.raises(llmprune.LlmpruneError) as info:
        llmprune.load(tiny_model_dir, runtime=llmprune.RuntimeConfig(gates=str(d)))
    msg = str(info.value)
    assert needle in msg and str(d) in msg and len(msg.splitlines()) == 1


def _rewrite_weights(d, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / GATES_FILE))
    edit(state)
    save_file(state, str(d / GATES_FILE))


BAD_WEIGHTS = [
    ("nan", lambda s: s["layers.1.k_proj"].view(-1)[3:4].fill_(float("nan")), "'layers.1.k_proj' holds NaN or infinite"),
    ("inf", lambda s: s["layers.0.dist_bias"].view(-1)[0:1].fill_(float("inf")), "'layers.0.dist_bias' holds NaN"),
    ("missing", lambda s: s.pop("layers.1.dist_bias"), "tensor 'layers.1.dist_bias' is missing"),
    ("extra", lambda s: s.update({"layers.2.q_proj": torch.zeros(1)}), "unexpected tensor 'layers.2.q_proj'"),
    ("shape", lambda s: s.update({"layers.0.k_proj": torch.zeros(2, 48, 15)}), "'layers.0.k_proj' has shape (2, 48, 15)"),
    ("dtype", lambda s: s.update({"layers.0.dist_bias": torch.zeros(2, 24, dtype=torch.int32)}), "expected floating point"),
]


@pytest.mark.parametrize("name,edit,needle", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_bad_gate_weights_name_file_and_tensor(name, edit, needle, trained, tmp_path, tiny_model_dir):
    d = _saved(trained, tmp_path / "g", tiny_model_dir)
    _rewrite_weights(d, edit)
    with pytest.raises(llmprune.LlmpruneError) as info:
        load_gates(d)
    assert needle in str(info.value) and str(d / GATES_FILE) in str(info.value)


@pytest.mark.parametrize("overrides,needle", [
    ({"num_layers": 3}, "gate_config.num_layers is 3 but the model has 2"),
    ({"head_dim": 8}, "gate_config.head_dim is 8 but the model has 16"),
    ({"num_heads": 8, "num_kv_heads": 4}, "gate_config.num_heads is 8 but the model has 4"),
    ({"num_kv_heads": 4}, "gate_config.num_kv_heads is 4 but the model has 2"),
])
def test_gates_of_another_model_shape(overrides, needle, tmp_path, tiny_model_dir, capsys):
    base = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, block_size=BS, gate_dim=8)
    cfg = GateConfig(**{**base, **overrides})
    save_gates([AttnGate(cfg) for _ in range(cfg.num_layers)], tmp_path / "g", {"base_model": str(tiny_model_dir)})
    data = tmp_path / "wiki.txt"
    data.write_text(" ".join(f"w{i % 100}" for i in range(600)))
    code = main(["ppl", str(tiny_model_dir), "--data-path", str(data), "--seqlen", "64", "--gates", str(tmp_path / "g"),
                 "--attn-sparsity", "0.5", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    assert needle in lines[0] and str(tmp_path / "g" / "attn_gates.json") in lines[0] and "different shape" in lines[0]
