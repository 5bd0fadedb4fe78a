"""Which inputs a layer's statistics see, ``calibration.sequential``: ``module`` (one pass) or ``layer``.

* ``layer``: every linear of a decoder layer is calibrated on the dense layer, all are pruned, and the pruned
  layer runs again for the next layer's inputs (two decoder forwards per layer; the Wanda and SparseGPT
  reference protocol).
* ``module``: each linear is calibrated on the layer with its earlier linears already pruned, and the pass that
  calibrates is the pass that produces the next layer's inputs (one forward per layer,
  :mod:`llmprune.engine.onepass`). All calibration batches are in flight together, so it needs more memory.
* ``auto`` (the default) resolves to ``module`` when its activations fit (RAM on the CPU, free memory on CUDA)
  and the run allows it, else to ``layer``; the resolved value is what ``llmprune.json`` records, so a run can
  be repeated exactly.
"""

from __future__ import annotations

import logging

import torch

from llmprune.config import CalibConfig, RecoveryConfig
from llmprune.engine.activations import RAM_SHARE, available_ram
from llmprune.errors import ConfigError
from llmprune.model.access import hidden_size
from llmprune.prune.registry import Method

log = logging.getLogger(__name__)

#: Fraction of the free CUDA memory the in-flight activations of a one-pass layer may take.
DEVICE_SHARE = 0.5


def inflight_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """Activations alive at once in a one-pass layer, for ``tokens`` calibration tokens of ``dtype`` (estimate).

    A batch paused before ``down_proj`` holds the residual stream, the MLP input and the MLP's inner
    activation; one paused before ``o_proj`` holds q, k, v and the attention output. The larger of the two,
    plus the layer's output, per token.
    """
    hidden = hidden_size(model_config) or 0
    inner = next((v for n in ("intermediate_size", "ffn_dim", "n_inner")
                  if isinstance(v := getattr(model_config, n, None), int) and v > 0), 4 * hidden)
    per_token = max(2 * hidden + inner, 4 * hidden) + hidden
    return tokens * per_token * torch.empty((), dtype=dtype).element_size()


def memory_for(device: torch.device) -> int:
    """Bytes a one-pass layer's activations may use on ``device`` now."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(DEVICE_SHARE * free)
    return int(RAM_SHARE * available_ram())


def resolve_sequential(requested: str, *, recover: RecoveryConfig | None, tokens: int, model_config,
                       dtype: torch.dtype, device: torch.device, allowed: bool = True) -> str:
    """``requested`` (a :attr:`CalibConfig.sequential` value) with ``auto`` resolved to ``module`` or ``layer``.

    Args:
        requested: ``"auto"``, ``"module"`` or ``"layer"``.
        recover: the recovery stage; block recovery needs the dense layer's outputs, so the ``layer`` order.
        tokens: calibration tokens of this process.
        model_config: the model's ``transformers`` config (sizes for :func:`inflight_bytes`).
        dtype: the dtype the layers compute in.
        device: where the layers run.
        allowed: False where the run cannot take the one-pass order (activations stored on disk, a process
            without calibration batches).
    """
    if requested not in CalibConfig.SEQUENTIAL:
        raise ConfigError(f"sequential must be one of {', '.join(CalibConfig.SEQUENTIAL)}, got {requested!r}")
    if requested != "auto":
        return requested
    if (recover is not None and recover.block is not None) or not allowed:
        return "layer"
    need, have = inflight_bytes(model_config, tokens, dtype), memory_for(device)
    if need > have:
        log.info("calibration: the one-pass (module) order needs ~%.1f GiB of activations, %.1f GiB are "
                 "available: using the two-pass (layer) order", need / 2**30, have / 2**30)
        return "layer"
    return "module"


def uses_one_pass(sequential: str, method: Method, recover: RecoveryConfig | None) -> bool:
    """Whether a layer loop runs ``method`` in one pass per layer (:mod:`llmprune.engine.onepass`): the resolved
    order is ``module``, the method has statistics (data-free methods need one pass anyway) and no block
    recovery runs (it needs the dense layer's outputs)."""
    return sequential == "module" and bool(method.stats) and recover is None
