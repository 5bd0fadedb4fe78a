"""Pruning methods: one module each (config dataclass + pure tensor core); registered in :mod:`llmprune.builtins`."""

from llmprune.prune.methods.cfsp import CFSPConfig
from llmprune.prune.methods.magnitude import MagnitudeConfig, magnitude_mask
from llmprune.prune.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune_weight
from llmprune.prune.methods.wanda import WandaConfig, wanda_mask

__all__ = [
    "CFSPConfig",
    "MagnitudeConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "magnitude_mask",
    "sparsegpt_prune_weight",
    "wanda_mask",
]
