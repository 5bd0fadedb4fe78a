"""llmprune: post-training compression for LLMs.

Quick start::

    import llmprune
    model = llmprune.load("smollm2-135m")
    report = llmprune.prune(model, llmprune.WandaConfig(sparsity="2:4"), calib_ids)
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from llmprune import methods, sparse24  # noqa: E402,F401  (register the built-in methods, the "packed" format)
from llmprune.api import PruneReport, compress, prune  # noqa: E402
from llmprune.config import CalibConfig, PruneConfig, Recipe, RuntimeConfig, SaveConfig  # noqa: E402
from llmprune.errors import ConfigError, LlmpruneError  # noqa: E402
from llmprune.gate_runtime import GateRuntime, attach_gates, detach_gates, gate_runtime  # noqa: E402
from llmprune.gate_training import train_gates  # noqa: E402
from llmprune.gates import AttnGate, GateConfig, load_gates, save_gates  # noqa: E402
from llmprune.kvcache import BitmapKVCache  # noqa: E402
from llmprune.methods import CFSPConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig  # noqa: E402
from llmprune.models import load_pretrained as load  # noqa: E402
from llmprune.models import load_tokenizer  # noqa: E402
from llmprune.perplexity import perplexity  # noqa: E402
from llmprune.recipe import load_recipe  # noqa: E402
from llmprune.registry import available_methods, register  # noqa: E402
from llmprune.sparse24 import Sparse24Linear, pack_24, unpack_24  # noqa: E402
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
