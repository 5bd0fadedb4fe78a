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

from llmprune import methods  # noqa: E402,F401  (registers the built-in methods)
from llmprune.api import PruneReport, compress, prune  # noqa: E402
from llmprune.config import CalibConfig, PruneConfig, Recipe, RuntimeConfig, SaveConfig  # noqa: E402
from llmprune.errors import ConfigError, LlmpruneError  # noqa: E402
from llmprune.methods import CFSPConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig  # noqa: E402
from llmprune.models import load_pretrained as load  # noqa: E402
from llmprune.models import load_tokenizer  # noqa: E402
from llmprune.perplexity import perplexity  # noqa: E402
from llmprune.recipe import load_recipe  # noqa: E402
from llmprune.registry import available_methods, register  # noqa: E402
from llmprune.sparsity import SparsityPattern  # noqa: E402

__all__ = [
    "CFSPConfig",
    "CalibConfig",
    "ConfigError",
    "LlmpruneError",
    "MagnitudeConfig",
    "PruneConfig",
    "PruneReport",
    "Recipe",
    "RuntimeConfig",
    "SaveConfig",
    "SparseGPTConfig",
    "SparsityPattern",
    "WandaConfig",
    "__version__",
    "available_methods",
    "compress",
    "load",
    "load_recipe",
    "load_tokenizer",
    "perplexity",
    "prune",
    "register",
]
