"""``Sparse24Linear`` (a linear whose weight is stored packed 2:4) and the model surgery that swaps it in and out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.formats.sparse24 import QUANT_METHOD, is_24, meta_words, pack_24, unpack_24
from llmprune.model.access import DEFAULT_IGNORE, decoder_layers_path, matches_any
from llmprune.model.structured import plain_classes
from llmprune.runtime.kernel_policy import SPARSE24_MAX_ROWS, use_kernel

#: Input dtypes the Triton kernel takes (it accumulates in fp32 but loads 16-bit values).
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class Sparse24Linear(nn.Module):
    """A linear layer whose weight is stored packed 2:4 (layout: :mod:`llmprune.formats.sparse24`).

    ``forward`` runs the Triton kernel (:func:`llmprune.kernels.sparse24_linear.sparse24_linear`) for fp16/bf16
    inputs of up to :data:`~llmprune.runtime.kernel_policy.SPARSE24_MAX_ROWS` rows where
    :func:`~llmprune.runtime.kernel_policy.use_kernel` allows it (CUDA by default), else unpacks the weight and
    uses ``F.linear`` (CPU, prefill).

    Args:
        in_features: input width, a multiple of 4.
        out_features: output width.
        bias: whether the layer has a bias.
        dtype: dtype of ``values`` and ``bias`` (default: torch's default dtype).
        device: where the (zero) tensors are allocated.

    Attributes:
        values: ``[out, in / 2]`` kept weights (a frozen parameter).
        meta: ``[out, ceil(in / 32)]`` int32 positions (a buffer).
        backend: kernel request, ``"auto"`` / ``"triton"`` / ``"torch"`` (see
            :mod:`llmprune.runtime.kernel_policy`); a class attribute, settable per instance.
    """

    backend: str = "auto"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=None, device=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"Sparse24Linear needs in_features divisible by 4, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        self.values = nn.Parameter(
            torch.zeros(out_features, in_features // 2, dtype=dtype, device=device), requires_grad=False
        )
        self.register_buffer(
            "meta", torch.zeros(out_features, meta_words(in_features), dtype=torch.int32, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Sparse24Linear:
        """Pack a 2:4-sparse ``nn.Linear`` (raises ``ValueError`` if it is not 2:4)."""
        w = linear.weight.data
        values, meta = pack_24(w)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device="meta")
        mod.values = nn.Parameter(values, requires_grad=False)
        mod.meta = meta
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (zeros included)."""
        return unpack_24(self.values, self.meta)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dense weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data.clone(), requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Sparse24Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            rows <= SPARSE24_MAX_ROWS
            and x.dtype in _KERNEL_DTYPES
            and x.dtype == self.values.dtype
            and use_kernel(x.device, requested=self.backend)
        ):
            # Imported on first use: triton's @jit picks compiled vs interpreted when the kernel module loads.
            from llmprune.kernels.sparse24_linear import sparse24_linear

            # check=False: the packed tensors are consistent by construction; the checks cost host time per step.
            y = sparse24_linear(
                x.reshape(rows, x.shape[-1]).contiguous(), self.values, self.meta, self.bias, check=False
            )
            return y.reshape(*x.shape[:-1], self.out_features)
        w = self.dense_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4 packed"


def packable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linears to store packed: ``Sparse24Linear`` modules, and 2:4-sparse ``nn.Linear`` in the decoder layers.

    ``lm_head``, embeddings and anything outside the decoder layers stay dense, as do linears that are not
    2:4 (e.g. left dense by ``--ignore``).

    Returns:
        ``{qualified name: module}``.
    """
    prefix = decoder_layers_path(model) + "."
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Sparse24Linear):
            out[name] = mod
        elif (
            isinstance(mod, nn.Linear)
            and name.startswith(prefix)
            and not matches_any(name, DEFAULT_IGNORE)
            and mod.in_features % 4 == 0
            and mod.weight.device.type != "meta"
            and is_24(mod.weight.data)
        ):
            out[name] = mod
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def pack_model(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace 2:4 linears by :class:`Sparse24Linear` in place (all packable ones unless ``names``).

    Returns:
        The sorted names of the packed linears.

    Raises:
        LlmpruneError: if a listed linear is not 2:4.
    """
    targets = packable_linears(model) if names is None else {n: model.get_submodule(n) for n in names}
    for name, mod in targets.items():
        if isinstance(mod, nn.Linear):
            try:
                _swap(model, name, Sparse24Linear.from_linear(mod))
            except ValueError as exc:
                raise LlmpruneError(f"{name}: {exc}") from None
    return sorted(targets)


def unpack_model(model: nn.Module) -> list[str]:
    """Replace every :class:`Sparse24Linear` by a dense ``nn.Linear`` in place; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)]
    for name in names:
        _swap(model, name, model.get_submodule(name).to_linear())
    config = getattr(model, "config", None)
    if config is not None and not any(isinstance(m, Sparse24Linear) for m in model.modules()):
        qc = getattr(config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method == QUANT_METHOD:  # a dense model again: saves as a checkpoint plain transformers loads
            del config.quantization_config
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
            plain_classes(model)
    return names


def _empty_sparse_modules(model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
    """Swap the (meta) linears ``names`` for empty (meta) ``Sparse24Linear`` modules, ready to be filled."""
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise LlmpruneError(f"packed checkpoint lists module {name!r}, which the model does not have") from None
        if not isinstance(lin, (nn.Linear, Sparse24Linear)):
            raise LlmpruneError(f"packed checkpoint lists {name!r}, which is a {type(lin).__name__}, not a linear")
        _swap(
            model,
            name,
            Sparse24Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=dtype, device="meta"),
        )
