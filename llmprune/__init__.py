"""llmprune: post-training compression for LLMs.

Quick start::

    import llmprune
    model = llmprune.load("smollm2-135m")
    report = llmprune.prune(model, llmprune.WandaConfig(sparsity="2:4"), calib_ids)

The package is organised by stage (see ``ARCHITECTURE.md``): ``model`` -> ``calibration`` -> ``prune`` ->
``engine`` -> ``formats`` -> ``runtime`` (+ ``llmprune.kernels``) -> ``evaluate`` -> ``publish``.
"""

from __future__ import annotations

import logging

from llmprune._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

from llmprune.builtins import register_builtins  # noqa: E402

register_builtins()

from llmprune.api import compress, prune  # noqa: E402
from llmprune.config import CalibConfig, PruneConfig, Recipe, RuntimeConfig, SaveConfig  # noqa: E402
from llmprune.errors import ConfigError, LlmpruneError  # noqa: E402
from llmprune.evaluate.perplexity import perplexity  # noqa: E402
from llmprune.model.loading import load_tokenizer  # noqa: E402
from llmprune.prune.methods import CFSPConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig  # noqa: E402
from llmprune.prune.registry import available_methods, register  # noqa: E402
from llmprune.prune.report import PruneReport  # noqa: E402
from llmprune.recipe import load_recipe  # noqa: E402
from llmprune.runtime.gates.files import load_gates, save_gates  # noqa: E402
from llmprune.runtime.gates.gate import AttnGate, GateConfig  # noqa: E402
from llmprune.runtime.gates.runtime import GateRuntime, attach_gates, detach_gates, gate_runtime  # noqa: E402
from llmprune.runtime.gates.training import train_gates  # noqa: E402
from llmprune.runtime.kvcache import BitmapKVCache  # noqa: E402
from llmprune.runtime.load import load_model as load  # noqa: E402
from llmprune.runtime.sparse24 import Sparse24Linear, pack_24, unpack_24  # noqa: E402
from llmprune.sparsity import SparsityPattern  # noqa: E402

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
    "compress",
    "detach_gates",
    "gate_runtime",
    "load",
    "load_gates",
    "load_recipe",
    "load_tokenizer",
    "pack_24",
    "perplexity",
    "prune",
    "register",
    "save_gates",
    "train_gates",
    "unpack_24",
]
