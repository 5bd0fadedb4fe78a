"""The one kernel-vs-torch rule (llmprune.runtime.kernel_policy) and the features that follow it."""

import llmprune.kernels.kv_bitmap_attention as kv_kernel
import pytest
import torch

from llmprune.errors import ConfigError
from llmprune.runtime import kernel_policy as kp
from llmprune.runtime.gates.runtime import GateRuntime
from llmprune.runtime.kvcache import BitmapKVCache


@pytest.mark.parametrize("value,on", [("", False), ("0", False), ("1", True)])
def test_rule(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert kp.interpreter_enabled() is on
    assert kp.use_kernel("cuda", requested="auto") and kp.use_kernel(torch.device("cuda", 1), requested="triton")
    assert not kp.use_kernel("cuda", requested="torch")
    assert not kp.use_kernel("cpu", requested="auto")  # auto never interprets
    assert kp.use_kernel("cpu", requested="triton") is on
    assert not kp.use_kernel("cpu", requested="torch")


def test_bad_backend_and_flags():
    with pytest.raises(ConfigError, match="backend must be auto, triton or torch"):
        kp.use_kernel("cpu", requested="cuda")
    with pytest.raises(ConfigError, match="backend"):
        BitmapKVCache(None, backend="fast")
    assert [kp.backend_from_flag(f) for f in (None, True, False)] == ["auto", "triton", "torch"]


def test_gate_runtime_flag_is_the_backend():
    rt = GateRuntime()
    assert rt.backend == "auto" and rt.use_kernel is None
    rt.use_kernel = True
    assert rt.backend == "triton"
    rt.use_kernel = False
    assert rt.backend == "torch" and rt.use_kernel is False


def test_dispatch_limits_fit_the_kernels():
    assert kp.KV_BITMAP_MAX_QUERIES <= kv_kernel.MAX_QUERIES
