"""llmprune: post-training compression for LLMs.

Quick start::

    import llmprune
    model = llmprune.load("smollm2-135m")
    report = llmprune.prune(model, llmprune.WandaConfig(sparsity="2:4"), calib_ids)

The package is organised by stage (see ``ARCHITECTURE.md``): ``model`` -> ``calibration`` -> ``prune`` ->
``engine`` -> ``formats`` -> ``runtime`` (+ ``llmprune.kernels``) -> ``evaluate`` -> ``publish``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

import llmprune.evaluate  # noqa: F401 - light (docstring only); ``llmprune.evaluate(...)`` runs lm-eval
import llmprune.prune  # noqa: F401 - light; imported first so the function ``prune`` below keeps the name
from llmprune import _registration
from llmprune._version import __version__
from llmprune.errors import ConfigError, LlmpruneError

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _register_builtins() -> None:
    from llmprune.builtins import register_builtins

    register_builtins()


def _register_methods() -> None:
    from llmprune.builtins import register_methods

    register_methods()


# The built-ins (methods, formats, transformers hooks) register on first use, or as soon as transformers is
# imported, so `import llmprune` stays light (no torch) and `AutoModelForCausalLM.from_pretrained` still reads
# llmprune's checkpoints after `import llmprune` (see llmprune/_registration.py).
_registration.set_registrar(_register_builtins, methods=_register_methods)
_registration.install()

#: public name -> module that defines it (imported on first access, PEP 562); ``name`` or ``module:attr``.
_LAZY = {
    "compress": "llmprune.workflow",  # a model in memory or a reference (then llmprune.api.compress)
    "save": "llmprune.workflow",
    "bench": "llmprune.evaluate.bench",
    "push": "llmprune.publish.hub",
    "convert": "llmprune.commands.convert",  # defined with its command for now (belongs in the API layer)
    "CalibConfig": "llmprune.config",
    "PruneConfig": "llmprune.config",
    "Recipe": "llmprune.config",
    "RuntimeConfig": "llmprune.config",
    "SaveConfig": "llmprune.config",
    "perplexity": "llmprune.workflow",  # (model, tokenizer, data_path=...) or (model, token ids)
    "load_tokenizer": "llmprune.model.loading",
    "CFSPConfig": "llmprune.prune.methods",
    "MagnitudeConfig": "llmprune.prune.methods",
    "SparseGPTConfig": "llmprune.prune.methods",
    "WandaConfig": "llmprune.prune.methods",
    "available_methods": "llmprune.prune.registry",
    "register": "llmprune.prune.registry",
    "PruneReport": "llmprune.prune.report",
    "load_recipe": "llmprune.recipe",
    "load_gates": "llmprune.runtime.gates.files",
    "save_gates": "llmprune.runtime.gates.files",
    "AttnGate": "llmprune.runtime.gates.gate",
    "GateConfig": "llmprune.runtime.gates.gate",
    "GateRuntime": "llmprune.runtime.gates.runtime",
    "attach_gates": "llmprune.runtime.gates.runtime",
    "detach_gates": "llmprune.runtime.gates.runtime",
    "gate_runtime": "llmprune.runtime.gates.runtime",
    "train_gates": "llmprune.runtime.gates.training",
    "BitmapKVCache": "llmprune.runtime.kvcache",
    "load": "llmprune.runtime.load:load_model",
    "Sparse24Linear": "llmprune.runtime.sparse24",
    "pack_24": "llmprune.runtime.sparse24",
    "unpack_24": "llmprune.runtime.sparse24",
    "SparsityPattern": "llmprune.sparsity",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # later accesses are plain attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _EvaluateModule(type(llmprune.evaluate)):
    """``llmprune.evaluate`` is the evaluation stage's package and, called, lm-eval on a model:
    ``llmprune.evaluate(model, tokenizer, tasks=[...])`` (:func:`llmprune.workflow.evaluate`)."""

    def __call__(self, model, tokenizer=None, tasks=(), **kwargs):
        from llmprune.workflow import evaluate

        return evaluate(model, tokenizer, tasks, **kwargs)


llmprune.evaluate.__class__ = _EvaluateModule


def prune(model, config, calib=None, **kwargs):
    """Prune ``model`` in place with one config or a sequence of stages: :func:`llmprune.api.prune`."""
    from llmprune.api import prune as _prune

    return _prune(model, config, calib, **kwargs)


if TYPE_CHECKING:  # what static tools see; at run time the names above load on first access
    from llmprune.commands.convert import convert
    from llmprune.config import CalibConfig, PruneConfig, Recipe, RuntimeConfig, SaveConfig
    from llmprune.evaluate.bench import bench
    from llmprune.model.loading import load_tokenizer
    from llmprune.prune.methods import CFSPConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig
    from llmprune.prune.registry import available_methods, register
    from llmprune.prune.report import PruneReport
    from llmprune.publish.hub import push
    from llmprune.recipe import load_recipe
    from llmprune.runtime.gates.files import load_gates, save_gates
    from llmprune.runtime.gates.gate import AttnGate, GateConfig
    from llmprune.runtime.gates.runtime import GateRuntime, attach_gates, detach_gates, gate_runtime
    from llmprune.runtime.gates.training import train_gates
    from llmprune.runtime.kvcache import BitmapKVCache
    from llmprune.runtime.load import load_model as load
    from llmprune.runtime.sparse24 import Sparse24Linear, pack_24, unpack_24
    from llmprune.sparsity import SparsityPattern
    from llmprune.workflow import compress, perplexity, save

__all__ = [
    "AttnGate",
    "BitmapKVCache",
    "CFSPConfig",
    "CalibConfig",
    "ConfigError",
    "GateConfig",
    "GateRuntime",
    "LlmpruneError",
    "MagnitudeConfig",
    "PruneConfig",
    "PruneReport",
    "Recipe",
    "RuntimeConfig",
    "SaveConfig",
    "Sparse24Linear",
    "SparseGPTConfig",
    "SparsityPattern",
    "WandaConfig",
    "__version__",
    "attach_gates",
    "available_methods",
    "bench",
    "compress",
    "convert",
    "evaluate",
    "detach_gates",
    "gate_runtime",
    "load",
    "load_gates",
    "load_recipe",
    "load_tokenizer",
    "pack_24",
    "perplexity",
    "prune",
    "push",
    "register",
    "save",
    "save_gates",
    "train_gates",
    "unpack_24",
]
