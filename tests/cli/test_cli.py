"""CLI behaviour: end-to-end on a tiny model, and every bad input -> one line, exit 2, nothing left behind."""

import json

import pytest
from helpers import run_cli, tiny_text

from llmprune.cli import main


def test_compress_end_to_end(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(
        capsys, "compress", tiny_model_dir, "--method", "sparsegpt", "--sparsity", "2:4", "--calib",
        tiny_calib_file, "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "--output", out_dir, "-q",
    )
    assert code == 0, err
    assert "50.00%" in out and str(out_dir) in out
    meta = json.loads((out_dir / "llmprune.json").read_text())
    assert meta["recipe"]["prune"][0]["method"] == "sparsegpt"
    assert meta["sparsity"]["overall"] == pytest.approx(0.5)


def test_compress_with_recipe_and_override(tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    out_dir = tmp_path / "r"
    code, _, err = run_cli(
        capsys, "compress", tiny_model_dir, "--recipe", "recipes/wanda-50.yaml", "--sparsity", "4:8",
        "--calib", tiny_calib_file, "--nsamples", 2, "--seqlen", 16, "--device", "cpu", "-o", out_dir, "-q",
    )
    assert code == 0, err
    meta = json.loads((out_dir / "llmprune.json").read_text())
    assert meta["recipe"]["prune"][0] == {"method": "wanda", "sparsity": "4:8", "ignore": []}
    assert meta["calibration"]["nsamples"] == 2


def test_magnitude_needs_no_calibration(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                           "--device", "cpu", "-o", tmp_path / "m", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "llmprune.json").read_text())["calibration"] is None


def test_ppl_command(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(tiny_text(300, seed=i) for i in range(3)))
    code, out, err = run_cli(capsys, "ppl", tiny_model_dir, "--data-path", text, "--seqlen", 64, "--max-windows", 3,
                             "--device", "cpu", "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert "3 windows x 64 tokens" in out
    assert json.loads((tmp_path / "r.json").read_text())["windows"] == 3


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "3:2"], "0 < N < M"),
        (["--sparsity", "0"], "strictly between 0 and 1"),
        (["--sparsity", "1.2"], "strictly between 0 and 1"),
        (["--sparsity", "abc"], "invalid sparsity 'abc'"),
        (["--method", "pruneit"], "unknown method 'pruneit'"),
        (["--recipe", "tests/data/bad_recipe.yaml"], "prune[0].blocksiz: unknown key"),
        (["--recipe", "does/not/exist.yaml"], "recipe file not found"),
        (["--nsamples", "0"], "nsamples must be an integer >= 1"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--format", "zip"], "unknown checkpoint format"),
        (["--nsamples", "x"], "invalid int value"),
    ],
)
def test_bad_flags(args, needle, tiny_model_dir, tiny_calib_file, tmp_path, capsys):
    out_dir = tmp_path / "never"
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--calib", tiny_calib_file, "--nsamples", 2,
                           "--seqlen", 16, "--device", "cpu", "-o", out_dir, *args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_unknown_model_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tmp_path / "no-such-model", "-o", tmp_path / "o")
    assert code == 2 and "model directory not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "compress", "nobody-xyz/no-such-model-123", "-o", tmp_path / "o", "--method", "magnitude")
    assert code == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_not_a_model_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "compress", tmp_path / "empty", "-o", tmp_path / "o")
    assert code == 2 and "not a model directory" in err


def test_output_exists(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "exists")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "exists",
                           "--overwrite", "--device", "cpu", "-q")
    assert code == 2 and "not an llmprune checkpoint" in err  # --overwrite only replaces llmprune's own outputs
    (tmp_path / "exists" / "llmprune.json").write_text("{}")
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "exists",
                           "--overwrite", "--device", "cpu", "-q")
    assert code == 0, err
    assert (tmp_path / "exists" / "llmprune.json").exists()


@pytest.mark.parametrize("content,needle", [("", "contains no text"), ("   \n\n", "contains no text")])
def test_empty_calibration_file(content, needle, tiny_model_dir, tmp_path, capsys):
    calib = tmp_path / "empty.txt"
    calib.write_text(content)
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--calib", calib, "--device", "cpu", "-o", tmp_path / "o")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_empty_jsonl_and_missing_file(tiny_model_dir, tmp_path, capsys):
    calib = tmp_path / "empty.jsonl"
    calib.write_text("")
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--calib", calib, "--device", "cpu", "-o", tmp_path / "o")
    assert code == 2 and "contains no text" in err
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--calib", tmp_path / "missing.parquet", "-o", tmp_path / "o")
    assert code == 2 and "calibration file not found" in err


def test_short_calibration(tiny_model_dir, tmp_path, capsys):
    calib = tmp_path / "short.txt"
    calib.write_text("w1 w2 w3")
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--calib", calib, "--seqlen", 64, "--device", "cpu",
                           "-o", tmp_path / "o")
    assert code == 2 and "fewer than seqlen=64" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2


@pytest.mark.parametrize("command", ["generate", "ppl", "eval", "bench"])
def test_runtime_flags_are_the_same_everywhere(command):
    import dataclasses

    from llmprune.cli import build_parser
    from llmprune.config import RuntimeConfig

    argv = [command, "m", "--kv-sparsity", "0.5", "--k-sparsity", "0.6", "--v-sparsity", "0.4", "--kv-window", "16",
            "--attn-sparsity", "0.3", "--gates", "g", "--kv-allocation", "b.json", "--act-sparsity", "0.4",
            "--act-prefill", "yes", "--act-thresholds", "a.json"] + (
                ["--prompt", "x"] if command == "generate" else [])
    args = build_parser().parse_args(argv)
    got = {f.name: getattr(args, f.name) for f in dataclasses.fields(RuntimeConfig)}
    assert got == {"kv_sparsity": 0.5, "kv_k_sparsity": 0.6, "kv_v_sparsity": 0.4, "kv_window": 16,
                   "attn_sparsity": 0.3, "gates": "g", "kv_allocation": "b.json", "act_sparsity": 0.4,
                   "act_prefill": True, "act_thresholds": "a.json"}
