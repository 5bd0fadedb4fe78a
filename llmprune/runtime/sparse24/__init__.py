"""Packed 2:4 weights at inference: ``Sparse24Linear``, model surgery and the ``"packed"`` checkpoint format.

* :mod:`~llmprune.runtime.sparse24.module`: :class:`Sparse24Linear`, :func:`pack_model` / :func:`unpack_model`;
* :mod:`~llmprune.runtime.sparse24.checkpoint`: :func:`save_packed` / :func:`load_packed` (the ``"packed"``
  format), :func:`check_recipe`;
* :mod:`~llmprune.runtime.sparse24.quantizer`: :func:`register_transformers_quantizer`, so plain
  ``AutoModelForCausalLM.from_pretrained(DIR)`` reads packed checkpoints.

The byte layout itself (:func:`pack_24` / :func:`unpack_24`) lives in :mod:`llmprune.formats.sparse24` and is
re-exported here.
"""

from llmprune.formats.sparse24 import (
    FORMAT_VERSION,
    PACKABLE_PATTERNS,
    QUANT_METHOD,
    is_24,
    meta_words,
    pack_24,
    unpack_24,
)
from llmprune.runtime.sparse24.checkpoint import check_recipe, load_packed, quant_config, save_packed
from llmprune.runtime.sparse24.module import Sparse24Linear, pack_model, packable_linears, unpack_model
from llmprune.runtime.sparse24.quantizer import register_transformers_quantizer

__all__ = [
    "FORMAT_VERSION",
    "PACKABLE_PATTERNS",
    "QUANT_METHOD",
    "Sparse24Linear",
    "check_recipe",
    "is_24",
    "load_packed",
    "meta_words",
    "pack_24",
    "pack_model",
    "packable_linears",
    "quant_config",
    "register_transformers_quantizer",
    "save_packed",
    "unpack_24",
    "unpack_model",
]
