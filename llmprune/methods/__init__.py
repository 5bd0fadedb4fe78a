"""Pruning methods. Importing this package registers each one explicitly."""

from llmprune.methods import cfsp, magnitude, sparsegpt, wanda  # noqa: F401
from llmprune.methods.cfsp import CFSPConfig
from llmprune.methods.magnitude import MagnitudeConfig, magnitude_mask
from llmprune.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune_weight
from llmprune.methods.wanda import WandaConfig, wanda_mask

__all__ = [
    "CFSPConfig",
    "MagnitudeConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "magnitude_mask",
    "sparsegpt_prune_weight",
    "wanda_mask",
]
