"""The one runtime-options path: RuntimeConfig from flags / checkpoint / recipe, resolved and applied."""

import argparse
import json

import pytest
from helpers import tiny_llama

from llmprune.config import DEFAULT_KV_WINDOW, RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.recipe import recipe_from_dict
from llmprune.runtime.kvcache import BitmapKVCache
from llmprune.runtime.options import (
    add_runtime_arguments,
    checkpoint_runtime,
    resolve_runtime,
    runtime_from_args,
    setup_runtime,
)


def _parse(*argv) -> RuntimeConfig:
    p = argparse.ArgumentParser()
    add_runtime_arguments(p)
    return runtime_from_args(p.parse_args([str(a) for a in argv]))


def test_flags_are_derived_from_the_config_fields():
    cfg = _parse("--kv-sparsity", 0.5, "--k-sparsity", 0.7, "--v-sparsity", 0.25, "--kv-window", 16,
                 "--attn-sparsity", 0.3, "--gates", "/g")
    assert cfg == RuntimeConfig(kv_sparsity=0.5, kv_k_sparsity=0.7, kv_v_sparsity=0.25, kv_window=16,
                                attn_sparsity=0.3, gates="/g")
    assert cfg.kv_cache_settings() == {"k_sparsity": 0.7, "v_sparsity": 0.25, "window": 16}
    assert _parse() == RuntimeConfig() and RuntimeConfig().kv_cache_settings() is None
    assert _parse("--k-sparsity", 0.5).kv_cache_settings() == {"k_sparsity": 0.5, "v_sparsity": 0.0,
                                                                 "window": DEFAULT_KV_WINDOW}


@pytest.mark.parametrize("kw,needle", [
    ({"kv_sparsity": 1.5}, "--k-sparsity must be in [0, 1), got 1.5 (runtime.kv_sparsity)"),
    ({"kv_sparsity": 0.5, "kv_v_sparsity": -1}, "--v-sparsity must be in [0, 1), got -1 (runtime.kv_v_sparsity)"),
    ({"attn_sparsity": True}, "--attn-sparsity must be in [0, 1)"),
    ({"kv_window": 8}, "--kv-window needs --kv-sparsity"),
    ({"kv_sparsity": 0.5, "kv_window": 0}, "--kv-window must be an integer >= 1"),
])
def test_one_validation_for_every_source(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RuntimeConfig(**kw)
    with pytest.raises(ConfigError, match="runtime"):
        recipe_from_dict({"prune": [{"method": "magnitude"}], "runtime": kw})


def test_override_is_per_group():
    import dataclasses

    grouped = [n for group in RuntimeConfig.GROUPS for n in group]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(RuntimeConfig))  # every field has a group
    recorded = RuntimeConfig(kv_k_sparsity=0.7, kv_window=16, attn_sparsity=0.5)
    assert recorded.override(RuntimeConfig()) == recorded
    assert recorded.override(RuntimeConfig(kv_sparsity=0.3)) == RuntimeConfig(kv_sparsity=0.3, attn_sparsity=0.5)
    assert recorded.override(RuntimeConfig(gates="/g")) == RuntimeConfig(kv_k_sparsity=0.7, kv_window=16, gates="/g")


def test_checkpoint_section(tmp_path, caplog):
    (tmp_path / "llmprune.json").write_text(json.dumps({"recipe": {"runtime": {"kv_sparsity": 0.5, "gates": "g"}}}))
    assert checkpoint_runtime(tmp_path) == RuntimeConfig(kv_sparsity=0.5, gates=str(tmp_path / "g"))
    assert checkpoint_runtime(tmp_path / "missing") == RuntimeConfig() == checkpoint_runtime(None)
    caplog.set_level("INFO", logger="llmprune.runtime.options")
    cfg = resolve_runtime(tmp_path, RuntimeConfig(kv_window=8, kv_sparsity=0.25))
    assert cfg == RuntimeConfig(kv_sparsity=0.25, kv_window=8, gates=str(tmp_path / "g"))
    assert "kv_sparsity=0.25 (flag)" in caplog.text and "(checkpoint)" in caplog.text
    (tmp_path / "llmprune.json").write_text(json.dumps({"recipe": {"runtime": {"kv_sparsity": 0.5, "bad": 1}}}))
    with pytest.raises(ConfigError, match=r"recipe.runtime.bad: unknown key"):
        checkpoint_runtime(tmp_path)


def test_setup_kv_cache_factory():
    model = tiny_llama()
    setup = setup_runtime(model, RuntimeConfig(kv_k_sparsity=0.5, kv_window=16))
    cache = setup.cache(2)
    assert isinstance(cache, BitmapKVCache) and (cache.k_sparsity, cache.v_sparsity, cache.window) == (0.5, 0.0, 16)
    assert setup.features == ["KV bitmap cache, K 50% / V 0% pruned, window 16"]
    assert setup_runtime(model).cache(1) is None
