"""eval/gpu_suite.py (the prepared GPU run) stays importable and plans its run without a GPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import gpu_suite  # noqa: E402


def test_dry_run_lists_every_goal_point(capsys):
    assert gpu_suite.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for needle in ("q/o_proj 4096x4096 M=1", "gate/up_proj 14336x4096 M=1", "down_proj 4096x14336 M=1",
                   "fused qkv 6144x4096 M=1", "[kv_bitmap] 32k 70%", "[gated] 32k 90% skipped", "[correctness]"):
        assert needle in out, needle
    assert "[act_sparse] q/o_proj 4096x4096 M=1 50% zeroed" in out
    assert out.count("goal >=") == 11 and "[e2e]" in out


def test_sections_and_arguments():
    args = gpu_suite.main.__globals__["argparse"].Namespace(only="gated", dtypes=["bf16"])
    steps = gpu_suite.plan(args)
    assert steps and {s.section for s in steps} == {"gated"}
    with pytest.raises(SystemExit):
        gpu_suite.main(["--only", "everything", "--dry-run"])
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dtypes", "fp8", "--dry-run"])
    assert gpu_suite.device_slug("NVIDIA H200") == "h200" and gpu_suite.device_slug("NVIDIA H100 80GB HBM3") == "h100"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(capsys):
    assert gpu_suite.main(["--only", "sparse24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_correctness_checks_run_interpreted_at_small_sizes(monkeypatch):
    """The suite's correctness code (inputs, float64 references, NaN poisoning, repeat) on CPU, interpreted."""
    if torch.cuda.is_available():
        pytest.skip("the GPU run covers this")
    monkeypatch.setattr(gpu_suite, "DEVICE", "cpu")
    monkeypatch.setitem(gpu_suite.ATTN, "hkv", 2)
    monkeypatch.setitem(gpu_suite.ATTN, "hq", 8)
    monkeypatch.setitem(gpu_suite.ATTN, "d", 64)
    gen = torch.Generator().manual_seed(0)
    checks = [
        gpu_suite.check_sparse24(dict(n=40, k=256, m=1, dtype="bf16"), gen),
        gpu_suite.check_sparse24(dict(n=24, k=128, m=3, dtype="fp16"), gen),
        gpu_suite.check_kv_bitmap(dict(context=96, sparsity=0.7, m=1, dtype="fp16"), gen),
        gpu_suite.check_kv_bitmap(dict(context=64 + 32, sparsity=0.5, m=4, dtype="bf16"), gen),
        gpu_suite.check_gated(dict(context=300, skip=0.5, dtype="bf16"), gen),
    ]
    for res in checks:
        assert res["ok"], res
    assert "correctness" in gpu_suite.summary_line(dict(checks[0], section="correctness", name="x"))
