"""Capturing the inputs of decoder layer 0 and running one layer on captured inputs.

The first step of the layer-by-layer protocol (SparseGPT/Wanda): run the embeddings on the calibration ids and
*capture* the inputs of decoder layer 0 (hidden states plus the keyword arguments the model passes to every
layer: attention mask, position ids, rotary ``position_embeddings``, ...). A pre-hook raises as soon as layer 0
is entered, so no layer runs. Later layers are then fed one at a time from these inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.model.access import decoder_layers, non_layer_modules
from llmprune.model.device import on_device


class _Captured(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration inputs of one decoder layer, one entry per batch.

    Attributes:
        hidden: ``[b, s, hidden]`` tensors.
        args: extra positional arguments of each call.
        kwargs: keyword arguments of each call (masks, rotary embeddings, ...).
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int = 8
) -> LayerInputs:
    """Inputs of decoder layer 0 for every calibration batch.

    Args:
        model: a causal LM (any device; non-layer modules are moved to ``device``
            for the capture and moved back).
        input_ids: ``[nsamples, seqlen]`` token ids.
        device: where the embeddings run and the captured tensors live.
        batch_size: sequences per forward pass.
    """
    layers = decoder_layers(model)
    captured = LayerInputs()

    def pre_hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        kw["use_cache"] = False
        captured.hidden.append(hidden.detach())
        captured.args.append(rest)
        captured.kwargs.append(kw)
        raise _Captured

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with on_device(non_layer_modules(model) + [layers[0]], device):
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: LayerInputs, index: int) -> torch.Tensor:
    """Output hidden states of ``layer`` for batch ``index`` of ``inputs``."""
    out = layer(inputs.hidden[index], *inputs.args[index], **inputs.kwargs[index])
    return out[0] if isinstance(out, (tuple, list)) else out
