"""The built-in methods, checkpoint formats and transformers hooks, registered explicitly in one place.

:func:`register_builtins` runs once, on first use (``llmprune._registration``: a registry lookup, or as soon as
transformers is imported after ``import llmprune``); :func:`register_methods` alone (torch only, no transformers)
serves method lookups such as ``llmprune compress --help``. Nothing else registers as a side effect of being
imported. Third-party code extends the same registries with
:func:`llmprune.register` (methods) and :func:`llmprune.formats.checkpoint.register_format` (formats).
"""

from __future__ import annotations

import functools
import logging

from llmprune.formats.checkpoint import register_format, save_dense
from llmprune.prune.methods.cfsp import CFSPConfig, cfsp_prune
from llmprune.prune.methods.magnitude import MagnitudeConfig, magnitude_prune
from llmprune.prune.methods.slicegpt import SliceGPTConfig, slicegpt_prune
from llmprune.prune.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
from llmprune.prune.methods.wanda import WandaConfig, wanda_prune
from llmprune.prune.registry import register

log = logging.getLogger(__name__)


@functools.cache
def register_methods() -> None:
    """Register the built-in pruning methods (idempotent; imports torch, not transformers)."""
    register("magnitude", MagnitudeConfig, magnitude_prune)
    register("wanda", WandaConfig, wanda_prune, stats=("act_sq_norm",))
    register("sparsegpt", SparseGPTConfig, sparsegpt_prune, stats=("hessian",))
    register("cfsp", CFSPConfig, cfsp_prune, kind="model")
    register("slicegpt", SliceGPTConfig, slicegpt_prune, kind="model")


@functools.cache
def register_builtins() -> None:
    """Register every built-in: methods, checkpoint formats, transformers hooks (idempotent)."""
    # here, not at the top: these import transformers, which method lookups alone do not need
    from llmprune.model.sliced import register_all as register_sliced_models
    from llmprune.model.structured import register_all as register_structured_models
    from llmprune.model.structured import save_structured
    from llmprune.runtime.gates.runtime import register_attention as register_gated_attention
    from llmprune.runtime.sparse24 import (
        check_recipe,
        load_packed,
        register_transformers_quantizer,
        save_packed,
    )

    register_methods()
    register_format("dense")(save_dense)
    register_format("structured")(save_structured)
    register_format("packed", load=load_packed, check=check_recipe)(save_packed)

    # transformers integration: per-layer-size model types, the packed-2:4 quantizer, the gated attention.
    register_structured_models()
    register_sliced_models()
    register_gated_attention()
    try:
        register_transformers_quantizer()
    except Exception as exc:  # pragma: no cover - never break `import llmprune` over the optional hook
        log.debug("transformers quantizer registration failed: %s", exc)
