"""Calibration: data loading, statistics accumulators and the layer-by-layer driver."""

from llmprune.calibration.data import load_calibration
from llmprune.calibration.driver import LayerInputs, capture_layer_inputs, prune_layerwise, run_layer
from llmprune.calibration.stats import STATS, ActSqNorm, Hessian

__all__ = [
    "STATS",
    "ActSqNorm",
    "Hessian",
    "LayerInputs",
    "capture_layer_inputs",
    "load_calibration",
    "prune_layerwise",
    "run_layer",
]
