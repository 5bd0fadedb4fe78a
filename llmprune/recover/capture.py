"""What block recovery needs from the dense pass of a decoder block: its inputs and the dense outputs.

While the dense block runs on its calibration batches (the statistics pass of the per-layer step, or a pass of
its own for data-free methods), forward hooks record, per batch, the block's own arguments, the arguments the
attention module received, the dense attention output and the dense block output. Nothing is copied: the
recorded tensors are the ones the forward pass produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DenseBatch:
    """One calibration batch of a decoder block, recorded from the dense forward pass.

    Attributes:
        args, kwargs: the block's call arguments (the ``[b, s, hidden]`` input hidden states among them).
        attn_args, attn_kwargs: the attention module's call arguments (None when it did not run).
        attn_out: dense attention output ``[b, s, hidden]`` (before the residual), or None.
        out: dense block output ``[b, s, hidden]``.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    attn_args: tuple | None = None
    attn_kwargs: dict | None = None
    attn_out: torch.Tensor | None = None
    out: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return int(self.out.shape[0])


def first_tensor(out) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple/list output."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def record_dense(layer: nn.Module, attn: nn.Module | None) -> Iterator[list[DenseBatch]]:
    """Record every forward of ``layer`` (and of its attention module ``attn``) inside the ``with`` block.

    Yields:
        The list the recorded :class:`DenseBatch` es are appended to, one per forward of ``layer``, in order.
    """
    batches: list[DenseBatch] = []

    def pre_layer(_mod, args, kwargs):
        batches.append(DenseBatch(tuple(args), dict(kwargs)))

    def post_layer(_mod, _args, _kwargs, out):
        batches[-1].out = first_tensor(out).detach()

    def pre_attn(_mod, args, kwargs):
        if batches:
            batches[-1].attn_args, batches[-1].attn_kwargs = tuple(args), dict(kwargs)

    def post_attn(_mod, _args, _kwargs, out):
        if batches:
            batches[-1].attn_out = first_tensor(out).detach()

    handles = [layer.register_forward_pre_hook(pre_layer, with_kwargs=True),
               layer.register_forward_hook(post_layer, with_kwargs=True)]
    if attn is not None:
        handles += [attn.register_forward_pre_hook(pre_attn, with_kwargs=True),
                    attn.register_forward_hook(post_attn, with_kwargs=True)]
    try:
        yield batches
    finally:
        for h in handles:
            h.remove()
