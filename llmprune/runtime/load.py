"""``llmprune.load``: a model as llmprune runs it (weights, attention gates, runtime options)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmprune.config import RuntimeConfig
from llmprune.formats.gates_meta import has_gates
from llmprune.model.loading import load_pretrained
from llmprune.runtime.gates.runtime import attach_gates
from llmprune.runtime.options import setup_runtime


def load_model(
    ref: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    gates: bool = True,
    runtime: RuntimeConfig | None = None,
):
    """Load a causal LM from an alias, a local directory or a Hub id, with its runtime features applied.

    Weights come from :func:`llmprune.model.loading.load_pretrained` (any llmprune checkpoint format).

    Args:
        ref: model reference (None = the embedded default); a gates-only directory written by
            ``llmprune train-gates`` loads its base model with those gates.
        dtype: ``"auto"`` keeps the checkpoint's dtype.
        device: where to put the model (default: CPU).
        trust_remote_code: passed to transformers; off unless the user asks.
        gates: attach the learned attention gates saved in ``ref`` (``attn_gates.safetensors``), if any.
        runtime: options to apply (bitmap KV cache, attention gates); None applies none. A checkpoint's
            recorded options are not applied implicitly: pass
            :func:`llmprune.runtime.options.resolve_runtime` ``(ref, flags)`` for that.

    Returns:
        The model; :func:`llmprune.runtime.options.runtime_setup` ``(model)`` tells what was applied (feature
        labels, the ``past_key_values`` factory for decoding).
    """
    model = load_pretrained(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    runtime = runtime if runtime is not None else RuntimeConfig()
    if gates and runtime.gates is None and ref is not None and has_gates(ref):
        attach_gates(model, Path(ref).expanduser())
    setup_runtime(model, runtime)
    return model
