"""Applying TEAL activation sparsity to a model: linears that zero their small inputs (decode by default).

Every linear of a decoder layer's input groups (:data:`~llmprune.runtime.actsparse.thresholds.GROUPS`) zeroes the
entries of its input with ``|x| < t`` (``t`` its group's threshold, compared in fp32) before the matmul:

* plain ``nn.Linear`` modules are swapped for :class:`ActSparseLinear` (same parameters, same ``state_dict``
  keys). On the torch path it zeroes and calls ``F.linear`` (the exact reference); where
  :func:`~llmprune.runtime.kernel_policy.use_kernel` allows (CUDA) and a decode step has at most
  :data:`~llmprune.runtime.kernel_policy.ACT_SPARSE_MAX_ROWS` rows of fp16/bf16, it runs the input-sparse GEMV
  (:func:`llmprune.kernels.act_sparse_gemv.act_sparse_gemv`), which applies the threshold itself and reads only
  the rows of ``W^T`` of the kept inputs. For that the weight is re-laid out once, in place, to column-major
  storage (``weight.t()`` contiguous: same values and shape, so ``F.linear`` and saving are unaffected);
* other linear modules (``Sparse24Linear``: packed 2:4) get a forward pre-hook that zeroes the input and then run
  as usual. Their kernel reads the packed values of every column, so the activation sparsity there changes the
  numbers but saves no bytes. An input-sparse 2:4 kernel is not written because it could save little: 2:4 keeps a
  different 2 of every 4 consecutive inputs in each output row, so one zeroed input's values are scattered over
  the rows and only a group whose 4 inputs are all zeroed could be skipped for every row; on SmolLM2-135M that is
  0.9% / 3.7% of the groups at 25% / 40% TEAL sparsity (``eval/act_group_zeros.py``).

Decode only by default: an input ``[b, s, in]`` with ``s > 1`` (prefill, or a verification forward) runs dense
unless ``prefill`` is set. :attr:`ActSparsity.enabled` switches the whole model back to dense (the dense
verifier of :mod:`llmprune.runtime.actsparse.correction`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import ConfigError
from llmprune.model.access import decoder_layers, projection_parents
from llmprune.runtime.actsparse.thresholds import GROUPS, ActThresholds, group_modules
from llmprune.runtime.kernel_policy import ACT_SPARSE_MAX_ROWS, use_kernel

log = logging.getLogger(__name__)
_ATTR = "_llmprune_act_sparsity"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def sparsify(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with the entries ``|x| < threshold`` (compared in fp32) set to zero; same shape and dtype."""
    return torch.where(x.abs().float() < threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)


@dataclass
class ActSparsity:
    """The activation-sparsity runtime of one model (shared by all its sparse linears).

    Attributes:
        target: model-level sparsity the thresholds were resolved at.
        allocation: ``"uniform"`` / ``"greedy"``.
        prefill: sparsify multi-token inputs too (default: decode steps only).
        enabled: False runs every linear dense (the model is then exactly the dense model).
        measure: count zeroed / total entries (a device sync per read of :meth:`measured`, not per step).
        thresholds: ``[{group: t}]`` per layer as applied.
    """

    target: float
    allocation: str
    prefill: bool = False
    enabled: bool = True
    measure: bool = False
    thresholds: list[dict[str, float]] = field(default_factory=list)
    _zeroed: list = field(default_factory=list, repr=False, init=False)
    _total: int = field(default=0, repr=False, init=False)
    _handles: list = field(default_factory=list, repr=False, init=False)
    _swapped: list = field(default_factory=list, repr=False, init=False)

    def active(self, x: torch.Tensor) -> bool:
        """Whether an input ``x`` is sparsified: enabled, and a decode step (``s == 1``) unless ``prefill``."""
        return self.enabled and (self.prefill or x.dim() < 3 or x.shape[-2] == 1)

    def count(self, x: torch.Tensor, threshold: float) -> None:
        if self.measure:
            self._zeroed.append((x.abs().float() < threshold).sum())
            self._total += x.numel()

    def measured(self) -> float | None:
        """Fraction of linear-input entries zeroed so far (with :attr:`measure`), or None."""
        if not self._total:
            return None
        return float(sum(int(z) for z in self._zeroed)) / self._total

    def label(self) -> str:
        where = "decode and prefill" if self.prefill else "decode"
        return f"activation sparsity {self.target:.0%} ({self.allocation} thresholds, {where})"


class ActSparseLinear(nn.Linear):
    """An ``nn.Linear`` that zeroes inputs below its group's threshold (see the module doc).

    Attributes:
        threshold: the magnitude threshold (fp32 value).
        runtime: the model's :class:`ActSparsity`.
        backend: kernel request (``"auto"`` / ``"triton"`` / ``"torch"``, :mod:`llmprune.runtime.kernel_policy`).
    """

    backend: str = "auto"

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float, runtime: ActSparsity) -> ActSparseLinear:
        """Wrap ``linear``'s own parameters (no copy)."""
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        mod.weight = linear.weight
        mod.bias = linear.bias
        mod.threshold = float(threshold)
        mod.runtime = runtime
        return mod

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same parameters (the weight back in row-major storage)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if not self.weight.is_contiguous():
            self.weight.data = self.weight.data.contiguous()
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def _kernel_ok(self, x: torch.Tensor, rows: int) -> bool:
        return (rows <= ACT_SPARSE_MAX_ROWS and x.dtype in _KERNEL_DTYPES and x.dtype == self.weight.dtype
                and use_kernel(x.device, requested=self.backend))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``; sparsified when :meth:`ActSparsity.active`."""
        rt = self.runtime
        if not rt.active(x):
            return F.linear(x, self.weight, self.bias)
        rt.count(x, self.threshold)
        rows = x.numel() // max(x.shape[-1], 1)
        if self._kernel_ok(x, rows):
            # imported on first use: triton picks interpreted vs compiled when the kernel module loads
            from llmprune.kernels.act_sparse_gemv import act_sparse_gemv

            if not self.weight.t().is_contiguous():  # once: W^T row-major, so a kept input is one contiguous row
                with torch.no_grad():
                    self.weight.data = self.weight.data.t().contiguous().t()
            y = act_sparse_gemv(x.reshape(rows, x.shape[-1]).contiguous(), self.weight.t(), self.threshold,
                                self.bias, check=False)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(sparsify(x, self.threshold), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_threshold={self.threshold:.4g}"


def _pre_hook(runtime: ActSparsity, threshold: float):
    def hook(module, args):
        x = args[0]
        if not runtime.active(x):
            return None
        runtime.count(x, threshold)
        return (sparsify(x, threshold), *args[1:])

    return hook


@contextlib.contextmanager
def sparsified_layer(layer: nn.Module, thresholds: dict[str, float]) -> Iterator[None]:
    """Within the block, ``layer``'s group linears zero every input entry (prefill too) below ``thresholds[group]``.

    Forward pre-hooks, removed on exit; used by the greedy calibration to measure block errors.
    """
    rt = ActSparsity(target=0.0, allocation="uniform", prefill=True)
    handles = []
    try:
        for group, mods in group_modules(layer).items():
            for mod in mods:
                handles.append(mod.register_forward_pre_hook(_pre_hook(rt, thresholds[group])))
        yield
    finally:
        for h in handles:
            h.remove()


def attach_act_sparsity(model: nn.Module, thresholds: ActThresholds, target: float | None = None,
                        prefill: bool = False) -> ActSparsity:
    """Make ``model``'s decoder linears activation-sparse at ``target`` (default: the calibrated target).

    Replaces a previous attachment. Returns the :class:`ActSparsity` (also :func:`act_sparsity` ``(model)``).

    Raises:
        ConfigError: when the thresholds have another number of layers than the model, or ``target`` is beyond
            what they were calibrated for.
    """
    detach_act_sparsity(model)
    layers = decoder_layers(model)
    if thresholds.layers != len(layers):
        raise ConfigError(f"activation thresholds are for {thresholds.layers} layers, the model has {len(layers)}")
    target = thresholds.target if target is None else float(target)
    per_layer = thresholds.thresholds(target)
    rt = ActSparsity(target=target, allocation=thresholds.allocation, prefill=bool(prefill), thresholds=per_layer)
    for layer, ts in zip(layers, per_layer):
        parts = projection_parents(layer)
        for group, members in GROUPS.items():
            for part, name in members:
                parent = parts[part]
                mod = getattr(parent, name)
                if type(mod) is nn.Linear:
                    setattr(parent, name, ActSparseLinear.from_linear(mod, ts[group], rt))
                    rt._swapped.append((parent, name))
                else:
                    rt._handles.append(mod.register_forward_pre_hook(_pre_hook(rt, ts[group])))
    object.__setattr__(model, _ATTR, rt)
    log.info("%s: %d linears swapped, %d hooked", rt.label(), len(rt._swapped), len(rt._handles))
    return rt


def detach_act_sparsity(model: nn.Module) -> None:
    """Undo :func:`attach_act_sparsity` (plain ``nn.Linear`` modules back, hooks removed); no-op if none."""
    rt = act_sparsity(model)
    if rt is None:
        return
    for parent, name in rt._swapped:
        mod = getattr(parent, name)
        if isinstance(mod, ActSparseLinear):
            setattr(parent, name, mod.to_linear())
    for h in rt._handles:
        h.remove()
    object.__delattr__(model, _ATTR)


def act_sparsity(model: nn.Module) -> ActSparsity | None:
    """The :class:`ActSparsity` attached to ``model``, or None."""
    return getattr(model, _ATTR, None)
