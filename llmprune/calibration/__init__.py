"""Calibration: data loading, layer-input capture, statistics accumulators and their distributed reduction.

Knows no pruning method: methods name the statistics they need and the engine feeds them.
"""

from llmprune.calibration.capture import LayerInputs, capture_layer_inputs, run_layer
from llmprune.calibration.data import load_calibration
from llmprune.calibration.stats import STATS, ActSqNorm, Hessian

__all__ = [
    "STATS",
    "ActSqNorm",
    "Hessian",
    "LayerInputs",
    "capture_layer_inputs",
    "load_calibration",
    "run_layer",
]
