"""Transformers integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` reads ``"packed"`` checkpoints.

After ``import llmprune`` (which calls :func:`register_transformers_quantizer`), a packed checkpoint loads through
plain transformers on versions with ``register_quantizer`` (5.x): a quantizer swaps the listed linears for
``Sparse24Linear`` before transformers fills the weights from the safetensors files, and validates every packed
linear after (:func:`~llmprune.runtime.sparse24.checkpoint.check_packed_modules`, the check
:func:`~llmprune.runtime.sparse24.checkpoint.load_packed` runs); the ``quantization_config`` is validated when
transformers reads it.
"""

from __future__ import annotations

import torch

from llmprune.formats.sparse24 import FORMAT_VERSION, QUANT_METHOD
from llmprune.runtime.sparse24.checkpoint import check_packed_modules, check_quant_config, quant_config
from llmprune.runtime.sparse24.module import _empty_sparse_modules


def register_transformers_quantizer() -> bool:
    """Register the ``llmprune_sparse24`` quantization config and quantizer with transformers.

    Returns:
        True if registered (now or before), False on transformers versions without the quantizer registry.
    """
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - older transformers
        return False
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return True

    @register_quantization_config(QUANT_METHOD)
    class Sparse24QuantConfig(QuantizationConfigMixin):
        """``quantization_config`` of a packed 2:4 checkpoint (see :mod:`llmprune.runtime.sparse24.checkpoint`)."""

        def __init__(self, modules=(), format_version: int = FORMAT_VERSION, **kwargs):
            self.quant_method = QUANT_METHOD
            # Validated like llmprune's own loader (ValueError: transformers' convention for bad configs).
            modules = list(modules) if isinstance(modules, tuple) else modules
            self.modules = check_quant_config({"format_version": format_version, "modules": modules})
            self.format_version = format_version

        def to_dict(self):
            return quant_config(self.modules) | {"format_version": self.format_version}

    @register_quantizer(QUANT_METHOD)
    class Sparse24HfQuantizer(HfQuantizer):
        """Swaps the listed linears for ``Sparse24Linear`` before transformers fills the weights."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            dtype = kwargs.get("dtype") or getattr(model.config, "dtype", None) or torch.float32
            _empty_sparse_modules(model, self.quantization_config.modules, dtype)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # The same check as load_packed: a corrupt packing fails here, not at the first forward.
            check_packed_modules(model, self.quantization_config.modules, getattr(model, "name_or_path", "") or "model")
            return model

        def is_serializable(self, *args, **kwargs):
            return True  # the state dict is the packed layout (values + meta), config.json keeps this config

        @property
        def is_trainable(self) -> bool:
            return False

    return True
