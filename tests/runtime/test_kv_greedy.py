"""Sensitivity (greedy, TEAL-style) KV budgets: error tables, the greedy optimum, exact means and bounds."""

import itertools
import random

import pytest

from llmprune.errors import ConfigError
from llmprune.formats.bitmap import keep_count
from llmprune.runtime.kvcache.budgets import KVBudgets
from llmprune.runtime.kvcache.greedy import allocate_greedy, error_table, sensitivity_budgets


def test_error_table_by_hand():
    t = error_table([4, 2], [1.0, 3.0], 8)
    # through (8, 0), (4, 1), (2, 3); below 2 the last slope (1 per entry) continues
    assert t == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    # a non-monotone measurement is made non-increasing in k; a concave one is replaced by its convex hull
    t = error_table([6, 4, 2], [0.5, 0.4, 4.0], 8)
    assert all(a >= b for a, b in zip(t, t[1:]))
    assert all(t[i - 1] - t[i] >= t[i] - t[i + 1] - 1e-12 for i in range(1, 8))
    assert t[8] == 0.0
    for bad in (([8], [1.0], 8), ([4, 4], [1.0, 2.0], 8), ([4], [float("nan")], 8), ([4, 2], [1.0], 8)):
        with pytest.raises(ConfigError):
            error_table(*bad)


def test_greedy_finds_the_brute_force_optimum_on_convex_tables():
    rng = random.Random(0)
    for _ in range(20):
        tables = [error_table([6, 4, 2, 1], sorted(rng.random() * 5 for _ in range(4)), 8) for _ in range(4)]
        total = rng.randint(8, 28)
        best = min(sum(tables[u][k] for u, k in enumerate(ks))
                   for ks in itertools.product(range(1, 9), repeat=4) if sum(ks) == total)
        got = allocate_greedy(tables, total, 1, 8)
        assert sum(got) == total and all(1 <= k <= 8 for k in got)
        assert sum(tables[u][k] for u, k in enumerate(got)) == pytest.approx(best)


def test_greedy_by_hand_and_bounds():
    cheap = [float(8 - k) * 0.1 for k in range(9)]  # 0.1 per removed entry
    dear = [float(8 - k) * 1.0 for k in range(9)]
    assert allocate_greedy([cheap, dear], 10, 1, 8) == [2, 8]  # remove from the cheap unit first
    assert allocate_greedy([cheap, dear], 10, 3, 8) == [3, 7]  # its lower bound reached: then the dear one
    assert allocate_greedy([dear, dear], 12, 1, 8) == [4, 8]   # ties: lower index first
    assert allocate_greedy([cheap, dear], 8, 1, 4, costs=[2, 2]) == [1, 3]
    with pytest.raises(ConfigError):
        allocate_greedy([cheap, dear], 1, 1, 8)
    with pytest.raises(ConfigError):
        allocate_greedy([cheap, dear], 17, 1, 8)


@pytest.mark.parametrize("s", [0.5, 0.6, 0.7, 0.8])
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("units", [1, 3])
def test_sensitivity_budgets_meet_the_mean_exactly_and_respect_bounds(s, joint, units):
    rng = random.Random(int(s * 10) + units)
    keeps = [32, 16, 8, 3]
    table = [[[sorted(rng.random() * 10 ** rng.uniform(-3, 0) for _ in keeps)
               for _ in range(units)] for _ in range(30)] for _ in range(2)]
    b = sensitivity_budgets(table[0], table[1], keeps, 64, 3, s, joint=joint)
    assert isinstance(b, KVBudgets) and b.allocation == "sensitivity" and (b.layers, b.heads) == (30, 3)
    k_uni = keep_count(64, s)
    kept_k, kept_v = sum(map(sum, b.k_keep)), sum(map(sum, b.v_keep))
    assert kept_k + kept_v == 2 * 30 * 3 * k_uni  # same entries, so the same bytes as uniform
    if not joint:
        assert kept_k == kept_v == 30 * 3 * k_uni and b.k_sparsity == b.v_sparsity == s
    else:
        assert b.k_sparsity == pytest.approx(b.mean_sparsity("k")) and b.v_sparsity == pytest.approx(b.mean_sparsity("v"))
    assert all(3 <= k <= 64 for t in (b.k_keep, b.v_keep) for row in t for k in row)
    if units == 1:
        assert all(len(set(row)) == 1 for t in (b.k_keep, b.v_keep) for row in t)
    c = sensitivity_budgets(table[0], table[1], keeps, 64, 3, s, joint=joint, min_sparsity=s - 0.1,
                            max_sparsity=s + 0.1)
    lo, hi = keep_count(64, s + 0.1), keep_count(64, s - 0.1)
    assert all(lo <= k <= hi for t in (c.k_keep, c.v_keep) for row in t for k in row)
    assert KVBudgets.from_dict(b.to_dict()).to_dict() == b.to_dict()


def test_joint_pool_moves_entries_to_the_fragile_kind():
    # keys 100x more costly to prune than values: the joint pool keeps more key entries than the uniform count
    keeps = [32, 16, 8, 3]
    k_err = [[[1.0, 2.0, 4.0, 8.0]]] * 4
    v_err = [[[0.01, 0.02, 0.04, 0.08]]] * 4
    b = sensitivity_budgets(k_err, v_err, keeps, 64, 2, 0.7)
    assert min(map(min, b.k_keep)) > keep_count(64, 0.7) > max(map(max, b.v_keep))
    with pytest.raises(ConfigError):
        sensitivity_budgets(k_err, v_err, keeps, 64, 2, 0.7, min_sparsity=0.8)
    with pytest.raises(ConfigError):
        sensitivity_budgets(k_err, v_err[:2], keeps, 64, 2, 0.7)


def test_calibrate_kv_sensitivity_checkpoint_and_runtime_pickup(checkpoint, tiny_calib_file, tmp_path, capsys):
    import json

    from helpers import run_cli, tiny_text

    from llmprune.runtime.kvcache.budgets import BUDGETS_FILE, load_budgets

    code, out, err = run_cli(capsys, "calibrate-kv", checkpoint, "--kv-sparsity", 0.5, "--allocation", "sensitivity",
                             "--calib", tiny_calib_file, "--nsamples", 1, "--seqlen", 48, "--device", "cpu", "-q")
    assert code == 0, err
    b = load_budgets(checkpoint / BUDGETS_FILE)
    assert b.allocation == "sensitivity" and (b.layers, b.heads, b.head_dim) == (2, 2, 16)
    assert sum(map(sum, b.k_keep)) + sum(map(sum, b.v_keep)) == 2 * 4 * keep_count(16, 0.5)  # joint: K+V total
    assert all(len(set(row)) == 1 for row in b.k_keep)  # per layer by default
    assert len(b.info["sensitivity"]["k_err"]) == 2 and b.info["sensitivity"]["keeps"] == [12, 8, 6, 4, 3, 2, 1]
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    rt = meta["recipe"]["runtime"]
    assert rt["kv_allocation"] == BUDGETS_FILE and rt["kv_k_sparsity"] == b.k_sparsity
    assert meta["kv_budgets"]["allocation"] == "sensitivity" and meta["kv_budgets"]["joint"] is True
    text = tmp_path / "wiki.txt"
    text.write_text(tiny_text(600))
    code, out, err = run_cli(capsys, "ppl", checkpoint, "--data-path", text, "--seqlen", 64, "--max-windows", 1,
                             "--device", "cpu", "-q")
    assert code == 0, err
    assert f"bitmap KV cache K {b.k_sparsity:g} / V {b.v_sparsity:g}" in out
    code, out, err = run_cli(capsys, "calibrate-kv", checkpoint, "--kv-sparsity", 0.5, "--allocation", "sensitivity",
                             "--kv-pool", "separate", "--max-sparsity", 0.6, "--calib", tiny_calib_file,
                             "--nsamples", 1, "--seqlen", 48, "--sens-keeps", "8,12", "--device", "cpu", "-q")
    assert code == 0, err
    b = load_budgets(checkpoint / BUDGETS_FILE)
    assert b.info["sensitivity"]["keeps"] == [12, 8]
    assert sum(map(sum, b.k_keep)) == sum(map(sum, b.v_keep)) == 4 * keep_count(16, 0.5)
    assert b.k_sparsity == b.v_sparsity == 0.5 and min(min(map(min, t)) for t in (b.k_keep, b.v_keep)) >= 6
    code, out, err = run_cli(capsys, "calibrate-kv", checkpoint, "--kv-sparsity", 0.5, "--allocation", "sensitivity",
                             "--min-sparsity", 0.6, "--calib", tiny_calib_file, "--device", "cpu", "-q")
    assert code == 2 and "must contain the mean" in err and err.count("\n") == 1


@pytest.mark.parametrize("keeps,msg", [("8,x", "comma-separated integers"), ("0,4", "keep counts >= 1"),
                                       ("16", "--sens-keeps: keep counts must be in [1, 16)")])
def test_calibrate_kv_bad_sens_keeps(tiny_model_dir, tiny_calib_file, tmp_path, capsys, keeps, msg):
    from helpers import run_cli

    code, out, err = run_cli(capsys, "calibrate-kv", tiny_model_dir, "--kv-sparsity", 0.5, "--allocation",
                             "sensitivity", "--sens-keeps", keeps, "--calib", tiny_calib_file, "--nsamples", 1,
                             "--seqlen", 32, "--output", tmp_path / "out", "--device", "cpu", "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmprune: error:") and msg in err, err
