"""Runtime options: one :class:`~llmprune.config.RuntimeConfig`, from every source, applied to a loaded model.

Every command that runs a model (``generate``, ``ppl``, ``eval``, ``bench``) takes the same flags and resolves
them the same way:

1. :func:`add_runtime_arguments` adds ``--kv-sparsity``, ``--k-sparsity``, ``--v-sparsity``, ``--kv-window``,
   ``--kv-allocation`` (per-layer/per-head budgets from ``llmprune calibrate-kv``), ``--attn-sparsity`` and
   ``--gates``, derived from the :class:`~llmprune.config.RuntimeConfig` fields;
   :func:`runtime_from_args` turns them back into a ``RuntimeConfig``.
2. :func:`resolve_runtime` puts those flags on top of the ``runtime`` section a checkpoint records in its
   ``llmprune.json`` (built like a recipe's, :func:`checkpoint_runtime`), group by group
   (:meth:`~llmprune.config.RuntimeConfig.override`), and logs what applies and where it came from.
3. :func:`setup_runtime` (called by :func:`llmprune.runtime.load.load_model`) applies the config through
   :data:`RUNTIME_FEATURES`: one :class:`RuntimeFeature` per feature, whose ``setup(model, config)`` configures
   the model in place and may return a ``past_key_values`` factory. The :class:`RuntimeSetup` it returns (also
   ``runtime_setup(model)``) lists the features for output and results.

Features: the bitmap KV cache (:class:`llmprune.runtime.kvcache.BitmapKVCache`; a decode cache, so lm-eval's
single-forward loglikelihood requests are not affected by it) and learned attention gates
(:func:`llmprune.runtime.gates.runtime.attach_gates`; active in every forward).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.config import RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.formats.checkpoint import read_metadata
from llmprune.runtime.actsparse.apply import attach_act_sparsity
from llmprune.runtime.actsparse.thresholds import load_thresholds
from llmprune.runtime.flags import add_runtime_arguments, runtime_from_args  # noqa: F401 - re-exported
from llmprune.runtime.gates.budgets import budgets_at
from llmprune.runtime.gates.runtime import GateRuntime, attach_gates, gate_runtime
from llmprune.runtime.kvcache import BitmapKVCache
from llmprune.runtime.kvcache.budgets import load_budgets
from llmprune.runtime.sparse24 import Sparse24Linear

log = logging.getLogger(__name__)

#: ``factory(batch_size) -> Cache`` handed to generation / decode loops as ``past_key_values``.
CacheFactory = Callable[[int], Any]
_ATTR = "_llmprune_runtime"


@dataclass
class RuntimeSetup:
    """What the runtime options did to a model.

    Attributes:
        config: the options applied (recorded with results as :attr:`options`).
        features: human-readable labels, e.g. ``["2:4 packed (210 linears)", "KV bitmap cache, ..."]``.
        past_key_values: cache factory for generation/decoding, or None (the HF default cache).
        gates: the attached attention gates' runtime (selection policy, counters), or None.
    """

    config: RuntimeConfig = field(default_factory=RuntimeConfig)
    features: list[str] = field(default_factory=list)
    past_key_values: CacheFactory | None = None
    gates: GateRuntime | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The applied options as recorded with results (fields that are set)."""
        return self.config.to_dict()

    def cache(self, batch_size: int) -> Any:
        """A fresh ``past_key_values`` for ``batch_size`` sequences, or None (the HF default cache)."""
        return self.past_key_values(batch_size) if self.past_key_values is not None else None


@dataclass(frozen=True)
class RuntimeFeature:
    """One runtime feature, turned on by setting any of its :class:`~llmprune.config.RuntimeConfig` fields.

    Attributes:
        option: the field that names the feature, e.g. ``"kv_sparsity"``.
        fields: every field the feature reads (it is enabled when one of them is set).
        setup: ``setup(model, config)`` configures ``model`` in place and returns None or a cache factory.
        label: ``label(config)`` for output, or None for features that show in :func:`model_features`.
    """

    option: str
    fields: tuple[str, ...]
    setup: Callable[[Any, RuntimeConfig], CacheFactory | None]
    label: Callable[[RuntimeConfig], str] | None = None

    def enabled(self, config: RuntimeConfig) -> bool:
        """True when ``config`` sets any of this feature's fields."""
        return any(getattr(config, name) is not None for name in self.fields)


def _setup_kv(model, config: RuntimeConfig) -> CacheFactory:
    """A pruned bitmap KV cache (recent ``window`` tokens dense) for decoding."""
    kv = config.kv_cache_settings()
    if "allocation" in kv:  # read the budgets file once
        kv = {**kv, "allocation": load_budgets(kv["allocation"])}
    BitmapKVCache(model.config, **kv)  # validate now, not at the first decode

    def factory(batch_size: int) -> BitmapKVCache:
        return BitmapKVCache(model.config, **kv)

    return factory


def _kv_label(config: RuntimeConfig) -> str:
    kv = config.kv_cache_settings()
    k, v = kv["k_sparsity"], kv["v_sparsity"]
    if k is None:  # a budgets file alone: its means
        budgets = load_budgets(kv["allocation"])
        k, v = budgets.k_sparsity, budgets.v_sparsity
    share = f"{k:.0%} of K/V" if k == v else f"K {k:.0%} / V {v:.0%}"
    where = f", per-layer/per-head budgets {kv['allocation']}" if "allocation" in kv else ""
    return f"KV bitmap cache, {share} pruned (mean){where}, window {kv['window']}" if where else \
        f"KV bitmap cache, {share} pruned, window {kv['window']}"


def _setup_attn(model, config: RuntimeConfig) -> None:
    """Learned attention gates: attached from ``gates``, or those loaded with the model reconfigured."""
    if config.gates is not None:
        attach_gates(model, Path(config.gates).expanduser(), attn_sparsity=config.attn_sparsity)
        return None
    rt = gate_runtime(model)
    if rt is None:
        raise ConfigError("--attn-sparsity needs attention gates: pass --gates DIR (from llmprune train-gates) "
                          "or load a directory that holds them")
    rt.sparsity, rt.threshold, rt.budget = config.attn_sparsity, None, None
    rt.layer_sparsity = budgets_at(rt.layer_sparsity, config.attn_sparsity)
    return None


def _setup_act(model, config: RuntimeConfig) -> None:
    """TEAL activation sparsity of the decoder linears (:mod:`llmprune.runtime.actsparse`)."""
    if config.act_thresholds is None:
        raise ConfigError("--act-sparsity needs calibrated thresholds: run llmprune calibrate-act on the model "
                          "(or pass --act-thresholds FILE)")
    attach_act_sparsity(model, load_thresholds(config.act_thresholds), config.act_sparsity,
                        prefill=bool(config.act_prefill))
    return None


def _act_label(config: RuntimeConfig) -> str:
    where = "decode and prefill" if config.act_prefill else "decode"
    level = f"{config.act_sparsity:.0%}" if config.act_sparsity is not None else "calibrated level"
    return f"activation sparsity {level} ({where}, thresholds {config.act_thresholds})"


RUNTIME_FEATURES: dict[str, RuntimeFeature] = {
    "kv_sparsity": RuntimeFeature("kv_sparsity", RuntimeConfig.KV_FIELDS, _setup_kv, _kv_label),
    "attn_sparsity": RuntimeFeature("attn_sparsity", RuntimeConfig.ATTN_FIELDS, _setup_attn),  # label: model_features
    "act_sparsity": RuntimeFeature("act_sparsity", RuntimeConfig.ACT_FIELDS, _setup_act, _act_label),
}


def model_features(model) -> list[str]:
    """Features visible in the model itself: packed 2:4 linears, attached attention gates."""
    out = []
    n = sum(isinstance(m, Sparse24Linear) for m in model.modules())
    if n:
        out.append(f"2:4 packed ({n} linears)")
    rt = gate_runtime(model)
    if rt is not None:
        if rt.sparsity:
            out.append(f"attention gates, {rt.sparsity:.0%} of KV blocks skipped")
        else:
            out.append("attention gates, " + ("threshold/budget selection" if rt.active else "inactive"))
    return out


def setup_runtime(model, config: RuntimeConfig | None = None) -> RuntimeSetup:
    """Apply ``config`` to ``model`` (in place) and remember the result as ``runtime_setup(model)``.

    Raises:
        ConfigError: when an option cannot apply to this model (e.g. ``--attn-sparsity`` without gates).
    """
    config = config if config is not None else RuntimeConfig()
    if not isinstance(config, RuntimeConfig):
        raise ConfigError(f"runtime options must be a RuntimeConfig, got {type(config).__name__}")
    enabled = [feat for feat in RUNTIME_FEATURES.values() if feat.enabled(config)]
    factory = None
    for feat in enabled:
        made = feat.setup(model, config)
        if made is not None:
            if factory is not None:
                raise ConfigError("two runtime features both provide a KV cache; enable one of them")
            factory = made
    features = model_features(model) + [feat.label(config) for feat in enabled if feat.label is not None]
    setup = RuntimeSetup(config, features, factory, gate_runtime(model))
    object.__setattr__(model, _ATTR, setup)  # not a submodule or parameter: state_dict is unchanged
    log.info("runtime features: %s", ", ".join(features) or "none (dense)")
    return setup


def runtime_setup(model) -> RuntimeSetup | None:
    """The :class:`RuntimeSetup` last applied to ``model`` (by :func:`setup_runtime` / ``load_model``), or None."""
    return getattr(model, _ATTR, None)


# --------------------------------------------------------------------------- sources: flags, checkpoint


def checkpoint_runtime(model_ref: str | os.PathLike | None) -> RuntimeConfig:
    """The ``recipe.runtime`` section of a checkpoint's ``llmprune.json`` (empty for anything else).

    Validated like a recipe's ``runtime`` section (unknown keys and bad values are errors); a relative ``gates``
    path is taken relative to the checkpoint.
    """
    if model_ref is None or not Path(model_ref).expanduser().is_dir():
        return RuntimeConfig()
    directory = Path(model_ref).expanduser()
    meta = read_metadata(directory) or {}
    section = (meta.get("recipe") or {}).get("runtime")
    if not section:
        return RuntimeConfig()
    config = RuntimeConfig.from_dict(section, f"{directory / 'llmprune.json'}: recipe.runtime")
    if config.gates is not None and not Path(config.gates).expanduser().is_absolute():
        config = dataclasses.replace(config, gates=str(directory / config.gates))
    alloc = config.kv_allocation
    if alloc is not None and alloc != "uniform" and not Path(alloc).expanduser().is_absolute():
        config = dataclasses.replace(config, kv_allocation=str(directory / alloc))
    act = config.act_thresholds
    if act is not None and not Path(act).expanduser().is_absolute():
        config = dataclasses.replace(config, act_thresholds=str(directory / act))
    return config


def resolve_runtime(model_ref: str | os.PathLike | None, flags: RuntimeConfig | None = None) -> RuntimeConfig:
    """The options to run ``model_ref`` with: its recorded runtime section, ``flags`` on top (group by group)."""
    flags = flags if flags is not None else RuntimeConfig()
    config = checkpoint_runtime(model_ref).override(flags)
    applied = config.to_dict()
    if applied:
        log.info("runtime options: %s", ", ".join(
            f"{k}={v} ({'flag' if getattr(flags, k) is not None else 'checkpoint'})" for k, v in applied.items()))
    return config
