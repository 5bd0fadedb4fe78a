"""TEAL activation sparsity: exact thresholds, exact zeroing, greedy vs uniform block error, the thresholds files,
calibrate-act and the runtime options, bad inputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli, tiny_llama, tiny_text
from torch import nn

from llmprune.calibration.magnitudes import AbsSample, magnitude_threshold, threshold_table
from llmprune.config import RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.runtime.actsparse.allocation import greedy_path
from llmprune.runtime.actsparse.apply import (
    ActSparseLinear,
    act_sparsity,
    attach_act_sparsity,
    detach_act_sparsity,
    sparsify,
)
from llmprune.runtime.actsparse.calibrate import act_threshold_tables
from llmprune.runtime.actsparse.thresholds import JSON_FILE, TENSOR_FILE, load_thresholds
from llmprune.runtime.options import resolve_runtime, setup_runtime

CPU = torch.device("cpu")


def test_thresholds_are_exact_quantiles_of_the_sample():
    acc = AbsSample(capacity=100)
    acc.add(torch.tensor([[4.0, -1.0], [3.0, -2.0]]))  # |x| = 1, 2, 3, 4
    acc.add(torch.tensor([-0.5]))
    a = acc.result()
    assert a.tolist() == [0.5, 1.0, 2.0, 3.0, 4.0] and acc.count == 5
    assert magnitude_threshold(a, 0.0) == 0.0  # nothing zeroed
    assert magnitude_threshold(a, 0.4) == 2.0  # zeroing |x| < 2 removes exactly 0.5 and 1
    assert magnitude_threshold(a, 0.6) == 3.0
    assert magnitude_threshold(a, 1.0) == math.inf
    assert (a < magnitude_threshold(a, 0.4)).sum() == 2
    t = threshold_table(a, 5)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, math.inf]
    with pytest.raises(ValueError):
        magnitude_threshold(a, 1.5)


def test_sample_is_uniform_without_replacement_over_capacity():
    acc = AbsSample(capacity=500, seed=1)
    for i in range(20):  # 0..9999 in batches of 500
        acc.add(torch.arange(i * 500, (i + 1) * 500, dtype=torch.float32))
    s = acc.result()
    assert s.numel() == 500 and acc.count == 10_000 and s.unique().numel() == 500
    assert abs(float(s.mean()) - 5000) < 400  # not biased to early or late batches
    assert abs(magnitude_threshold(s, 0.5) - 5000) < 600


def test_sparsify_zeroes_exactly_below_the_threshold():
    x = torch.tensor([[0.3, -0.2, 0.2, -0.7, 0.0]], dtype=torch.float16)
    y = sparsify(x, 0.2998046875)  # fp16(0.3) is kept: compared in fp32 against a threshold it equals
    assert y.dtype == torch.float16 and y.tolist() == [[x[0, 0].item(), 0.0, 0.0, x[0, 3].item(), 0.0]]


def _tables(model, allocation="uniform", target=0.5, **kw):
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return act_threshold_tables(model, ids, CPU, target, allocation, batch_size=2, **kw), ids


def test_attach_zeroes_inputs_at_decode_only_and_detach_restores_dense():
    model = tiny_llama()
    th, ids = _tables(model)
    with torch.no_grad():
        ref = model(ids).logits
        keys = set(model.state_dict())
        rt = attach_act_sparsity(model, th, 0.4)
        assert act_sparsity(model) is rt and set(model.state_dict()) == keys
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, ActSparseLinear) and q.threshold == rt.thresholds[0]["qkv"] > 0
        assert torch.equal(model(ids).logits, ref)  # prefill stays dense by default
        x = torch.randn(2, 1, 64)
        assert torch.equal(q(x), F.linear(sparsify(x, q.threshold), q.weight, q.bias))  # decode step: sparse
        assert not torch.equal(q(x), F.linear(x, q.weight))
        rt.prefill = True
        sparse = model(ids).logits
        assert not torch.allclose(sparse, ref)
        rt.enabled = False  # the dense verifier
        assert torch.equal(model(ids).logits, ref)
        detach_act_sparsity(model)
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear and act_sparsity(model) is None
        assert torch.equal(model(ids).logits, ref)


def test_uniform_level_zeroes_the_target_fraction_of_calibration_inputs():
    model = tiny_llama()
    th, ids = _tables(model)
    rt = attach_act_sparsity(model, th, 0.5, prefill=True)
    rt.measure = True
    with torch.no_grad():
        model(ids)
    assert abs(rt.measured() - 0.5) < 0.02  # same tokens as calibration: the quantiles hold


def test_greedy_path_picks_the_cheapest_group():
    # error = sum of costs * sparsity: group 1 is free, so it goes first, up to its cap; then group 2
    costs = [3.0, 0.0, 1.0, 2.0]
    err = lambda s: sum(c * x for c, x in zip(costs, s))  # noqa: E731
    levels, path, errs = greedy_path(err, [1, 1, 1, 1], 0.5, step=0.125, max_group=1.0)
    assert levels == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert path[1] == [0.0, 0.5, 0.0, 0.0] and path[2] == [0.0, 1.0, 0.0, 0.0] and path[-1] == [0.0, 1.0, 1.0, 0.0]
    assert errs == [0.0, 0.0, 0.0, 0.5, 1.0]
    # under the default cap (0.99) the free group stops at block 0.2475: a shorter step, the target still reached
    levels, path, _ = greedy_path(err, [1, 1, 1, 1], 0.5, step=0.125)
    assert abs(levels[2] - 0.2475) < 1e-9 and levels[-1] == 0.5 and path[-1][1] == 0.99
    with pytest.raises(ConfigError, match="target"):
        greedy_path(lambda s: 0.0, [1, 1, 1, 1], 1.0)


def test_greedy_block_error_not_worse_than_uniform_on_a_tiny_model():
    model = tiny_llama()
    th, _ = _tables(model, "greedy", greedy_tokens=64, step=0.25, greedy_error="relative")
    g, u = th.info["block_error"]["greedy"], th.info["block_error"]["uniform"]
    assert len(g) == 2 and all(a <= b for a, b in zip(g, u)), (g, u)
    assert all(abs(b - 0.5) < 1e-6 for b in th.block_sparsity())  # every block exactly at the target
    assert all(abs(b - 0.3) < 1e-6 for b in th.block_sparsity(0.3))  # between two levels  # lower levels read off the path
    with pytest.raises(ConfigError, match="calibrate-act"):
        th.thresholds(0.6)


def test_block_error_measures_and_the_teal_option():
    from llmprune.runtime.actsparse.calibrate import block_error

    r = torch.ones(1, 8, 2)
    y = r.clone()
    y[0, 0] += 100.0  # a massive first position
    y[0, 7, 0] += 3.0
    y[0, 6, 1] += 4.0
    assert block_error([y], [r]) == pytest.approx((2 * 100.0 ** 2 + 9 + 16) / 16)  # dominated by position 0
    # teal: positions 6..7 only, L2 over them per channel (3 and 4), mean over channels
    assert block_error([y], [r], "teal") == pytest.approx(3.5)
    model = tiny_llama()
    th, _ = _tables(model, "greedy", greedy_tokens=64, step=0.25, greedy_error="teal")
    assert th.info["greedy_error"] == "teal" and all(abs(b - 0.5) < 1e-6 for b in th.block_sparsity())
    with pytest.raises(ConfigError, match="--greedy-error"):
        _tables(model, "greedy", greedy_error="l1")


def test_thresholds_save_load_round_trip(tmp_path):
    model = tiny_llama()
    th, _ = _tables(model, "greedy", greedy_tokens=64, step=0.5)
    path = th.save(tmp_path)
    assert path.name == JSON_FILE and (tmp_path / TENSOR_FILE).is_file()
    back = load_thresholds(tmp_path)
    for name in ("quantiles", "levels", "path", "params"):
        assert torch.equal(getattr(back, name), getattr(th, name).to(getattr(back, name).dtype)), name
    assert back.target == 0.5 and back.allocation == "greedy" and back.thresholds() == th.thresholds()
    assert load_thresholds(tmp_path / TENSOR_FILE).target == 0.5


def test_bad_threshold_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="calibrate-act"):
        load_thresholds(tmp_path / "nope.json")
    (tmp_path / JSON_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_thresholds(tmp_path)
    (tmp_path / JSON_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ConfigError, match="not an activation thresholds file"):
        load_thresholds(tmp_path)
    model = tiny_llama()
    th, _ = _tables(model)
    th.save(tmp_path)
    with pytest.raises(ConfigError, match="2 layers, the model has 3"):
        attach_act_sparsity(tiny_llama(num_hidden_layers=3), th)
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    (tmp_path / JSON_FILE).write_text(json.dumps({**meta, "tensors": "../x.safetensors"}))
    with pytest.raises(ConfigError, match="bad 'tensors'"):
        load_thresholds(tmp_path)


def test_runtime_config_fields_and_groups():
    with pytest.raises(ConfigError, match=r"--act-sparsity must be in \[0, 1\)"):
        RuntimeConfig(act_sparsity=1.5)
    with pytest.raises(ConfigError, match="--act-prefill must be yes or no"):
        RuntimeConfig(act_prefill="maybe")
    with pytest.raises(ConfigError, match="unknown key"):
        RuntimeConfig.from_dict({"act_sparsty": 0.4})
    # a level flag keeps the checkpoint's thresholds file (its own group)
    rec = RuntimeConfig(act_sparsity=0.5, act_thresholds="act_thresholds.json", kv_sparsity=0.5)
    assert rec.override(RuntimeConfig(act_sparsity=0.25)) == RuntimeConfig(
        act_sparsity=0.25, act_thresholds="act_thresholds.json", kv_sparsity=0.5)
    assert rec.override(RuntimeConfig(act_prefill=True)).act_sparsity == 0.5  # --act-prefill keeps the level
    with pytest.raises(ConfigError, match="needs calibrated thresholds"):
        setup_runtime(tiny_llama(), RuntimeConfig(act_sparsity=0.4))


def test_calibrate_act_checkpoint_and_runtime_pickup(checkpoint, tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    code, out, err = run_cli(capsys, "calibrate-act", checkpoint, "--act-sparsity", 0.5, "--allocation", "greedy",
                             "--step", 0.25, "--greedy-tokens", 32, "--calib", tiny_calib_file, "--nsamples", 4,
                             "--seqlen", 32, "--device", "cpu", "-q")
    assert code == 0, err
    assert "recorded in" in out and "block output error" in out and (checkpoint / TENSOR_FILE).is_file()
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    assert meta["recipe"]["runtime"]["act_thresholds"] == JSON_FILE and meta["act_thresholds"]["allocation"] == "greedy"
    cfg = resolve_runtime(checkpoint, RuntimeConfig(act_sparsity=0.25, act_prefill=True))
    assert cfg.act_thresholds == str(checkpoint / JSON_FILE) and cfg.act_sparsity == 0.25
    import llmprune

    model = llmprune.load(checkpoint, device="cpu", runtime=cfg)
    assert act_sparsity(model).target == 0.25 and act_sparsity(model).prefill
    text = tmp_path / "wiki.txt"
    text.write_text(tiny_text(600))
    code, out, err = run_cli(capsys, "ppl", checkpoint, "--data-path", text, "--seqlen", 64, "--max-windows", 1,
                             "--act-prefill", "yes", "--device", "cpu", "-q")
    assert code == 0, err
    assert "activation sparsity 50%" in out + err
    code, out, err = run_cli(capsys, "ppl", checkpoint, "--data-path", text, "--seqlen", 64, "--max-windows", 1,
                             "--act-sparsity", 0.75, "--device", "cpu", "-q")
    assert code == 2 and err.count("\n") == 1 and "up to 0.5" in err, err
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", "w1 w2 w3", "--max-new-tokens", 12,
                             "--act-correction", 3, "--device", "cpu", "-q")
    assert code == 0, err
    assert "mean accepted length" in err and "dense verifications" in err
    from llmprune.publish.modelcard import build_card

    assert "--act-thresholds act_thresholds.json" in build_card(checkpoint)


@pytest.mark.parametrize("argv,msg", [
    (("--act-sparsity", 1.5), "--act-sparsity must be in (0, 1)"),
    (("--allocation", "random"), "invalid choice"),
    (("--step", 0), "--step must be in (0, 1]"),
    ((), "not a checkpoint directory"),
])
def test_calibrate_act_bad_inputs(tiny_model_dir, capsys, argv, msg):
    code, out, err = run_cli(capsys, "calibrate-act", tiny_model_dir, *argv, "--calib", "self", "--device", "cpu", "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmprune: error:") and msg in err, err


def test_correction_gives_the_dense_greedy_output_and_counts_accepted_tokens():
    from llmprune.runtime.actsparse.correction import generate_with_correction

    model = tiny_llama()
    th, ids = _tables(model)
    prompt = ids[:1, 5:15]
    with torch.no_grad():
        dense = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, 10:]
        attach_act_sparsity(model, th, 0.5)
        sparse = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, 10:]
    assert not torch.equal(sparse, dense)  # the sparse model alone drifts
    for k in (3,):
        res = generate_with_correction(model, prompt, 16, k)
        assert torch.equal(res.tokens, dense), k  # every kept token is the dense greedy choice
        assert all(0 <= a <= k for a in res.accepted) and 0 < res.mean_accepted < k
        assert act_sparsity(model).enabled  # restored after the dense verifications
    with pytest.raises(ConfigError, match="batch size 1"):
        generate_with_correction(model, ids[:2, :10], 4, 2)
    with pytest.raises(ConfigError, match="integer >= 1"):
        generate_with_correction(model, prompt, 4, 0)
    detach_act_sparsity(model)
    with pytest.raises(ConfigError, match="needs activation sparsity"):
        generate_with_correction(model, prompt, 4, 2)


def test_kernel_path_matches_the_torch_path_and_keeps_the_weight():
    # backend "triton" runs the input-sparse GEMV through Triton's interpreter on CPU (conftest sets it)
    from helpers import check_close

    from llmprune.runtime.actsparse.apply import ActSparsity

    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    w = lin.weight.detach().clone()
    mod = ActSparseLinear.from_linear(lin, 0.5, ActSparsity(target=0.5, allocation="uniform"))
    x = torch.randn(3, 1, 96).to(torch.bfloat16)
    ref = mod(x)  # torch path (backend auto on CPU)
    mod.backend = "triton"
    y = mod(x)
    check_close(y, ref)
    assert mod.weight.t().is_contiguous() and torch.equal(mod.weight, w)  # re-laid out once, same values
    assert torch.equal(mod.to_linear().weight, w) and mod.to_linear().weight.is_contiguous()
    many = torch.randn(1, 5, 96).to(torch.bfloat16)  # 5 rows > ACT_SPARSE_MAX_ROWS: F.linear, prefill dense
    assert torch.equal(mod(many), F.linear(many, w, lin.bias))


def test_compress_act_sparsity_calibrates_the_pruned_checkpoint(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "ck"
    code, text, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                              "--calib", tiny_calib_file, "--nsamples", 2, "--seqlen", 32, "--act-sparsity", 0.4,
                              "--device", "cpu", "-o", out, "-q")
    assert code == 0, err
    assert "activation thresholds (uniform, 40%)" in text
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["recipe"]["runtime"] == {"act_sparsity": 0.4, "act_thresholds": JSON_FILE}
    assert load_thresholds(out).target == 0.4
    code, text, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--act-sparsity", 1.0,
                              "--device", "cpu", "-o", tmp_path / "bad", "-q")
    assert code == 2 and "--act-sparsity must be in (0, 1)" in err and not (tmp_path / "bad").exists()


def test_packed_24_linears_are_sparsified_by_pre_hooks(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    import llmprune
    from llmprune.runtime.sparse24 import Sparse24Linear

    out = tmp_path / "packed"
    code, text, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--sparsity", "2:4",
                              "--format", "packed", "--device", "cpu", "-o", out, "-q")
    assert code == 0, err
    model = llmprune.load(out, device="cpu")
    th, ids = _tables(model)
    with torch.no_grad():
        ref = model(ids).logits
        rt = attach_act_sparsity(model, th, 0.5, prefill=True)
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, Sparse24Linear) and len(rt._handles) == 14 and not rt._swapped
        x = torch.randn(1, 1, 64)
        assert torch.equal(q(x), F.linear(sparsify(x, rt.thresholds[0]["qkv"]), q.dense_weight(), q.bias))
        assert not torch.allclose(model(ids).logits, ref)
        detach_act_sparsity(model)
        assert torch.equal(model(ids).logits, ref)
