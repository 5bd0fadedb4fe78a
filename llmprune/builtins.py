"""The built-in methods, checkpoint formats and transformers hooks, registered explicitly in one place.

:func:`register_builtins` runs once when the package is imported (``import llmprune``); nothing else registers
as a side effect of being imported. Third-party code extends the same registries with
:func:`llmprune.register` (methods) and :func:`llmprune.formats.checkpoint.register_format` (formats).
"""

from __future__ import annotations

import functools
import logging

from llmprune.formats.checkpoint import register_format, save_dense
from llmprune.model.structured import register_all as register_structured_models
from llmprune.model.structured import save_structured
from llmprune.prune.methods.cfsp import CFSPConfig, cfsp_prune
from llmprune.prune.methods.magnitude import MagnitudeConfig, magnitude_prune
from llmprune.prune.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
from llmprune.prune.methods.wanda import WandaConfig, wanda_prune
from llmprune.prune.registry import register
from llmprune.runtime.gates.runtime import register_attention as register_gated_attention
from llmprune.runtime.sparse24 import check_recipe, load_packed, register_transformers_quantizer, save_packed

log = logging.getLogger(__name__)


@functools.cache
def register_builtins() -> None:
    """Register every built-in (idempotent)."""
    register("magnitude", MagnitudeConfig, magnitude_prune)
    register("wanda", WandaConfig, wanda_prune, stats=("act_sq_norm",))
    register("sparsegpt", SparseGPTConfig, sparsegpt_prune, stats=("hessian",))
    register("cfsp", CFSPConfig, cfsp_prune, kind="model")

    register_format("dense")(save_dense)
    register_format("structured")(save_structured)
    register_format("packed", load=load_packed, check=check_recipe)(save_packed)

    # transformers integration: per-layer-size model types, the packed-2:4 quantizer, the gated attention.
    register_structured_models()
    register_gated_attention()
    try:
        register_transformers_quantizer()
    except Exception as exc:  # pragma: no cover - never break `import llmprune` over the optional hook
        log.debug("transformers quantizer registration failed: %s", exc)
