"""Contextual activation sparsity at decode (TEAL thresholds), its calibration and Sirius-style correction."""

from llmprune.runtime.actsparse.apply import ActSparseLinear, ActSparsity, act_sparsity, attach_act_sparsity
from llmprune.runtime.actsparse.thresholds import ActThresholds, load_thresholds

__all__ = ["ActSparseLinear", "ActSparsity", "ActThresholds", "act_sparsity", "attach_act_sparsity",
           "load_thresholds"]
