"""Matrix entropy (effective rank) of keys and values per layer and KV head, from calibration activations.

UNComp ("Can Matrix Entropy Uncover Sparsity?") scores a set of vectors ``X [n, d]`` by the Shannon entropy of
the normalised eigenvalue spectrum of its second-moment matrix:

    ``Sigma = X^T X / n``,  ``p_i = lambda_i / sum_j lambda_j``,  ``H(X) = -sum_i p_i log p_i``  (nats)

so ``H = 0`` for rank-1 ``X`` (all vectors on one line) and ``H = log d`` for an isotropic ``X``
(``Sigma ~ I``); ``exp(H)`` is the effective rank. The second moment is not centred: the bitmap KV cache prunes
raw magnitudes, so a common offset (the outlier channels of keys) is part of what makes a head compressible.

Which activations: the outputs of ``k_proj`` / ``v_proj``, one ``head_dim`` slice per KV head. For values that is
exactly what the cache stores. For keys it is the key *before* RoPE: the rotary embedding is an orthogonal,
position-dependent rotation of coordinate pairs, so it keeps each token's norm and each pair's energy, but the
pre-RoPE spectrum is position-independent (no dependence on the calibration lengths) and it is exactly
``W_k Sigma_x W_k^T`` of the layer's *input* second moment, which the existing calibration hooks already
collect (:func:`llmprune.calibration.collect.collect` feeds module inputs). Every score is therefore computed
from one ``[hidden, hidden]`` input Gram matrix per layer (k_proj and v_proj share their input), with the bias
handled exactly when there is one.

:func:`kv_entropy_scores` runs the layer-by-layer protocol (capture the inputs of layer 0, then one decoder layer
on the device at a time, its dense output feeding the next) and returns per-layer, per-KV-head entropies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.calibration.capture import capture_layer_inputs, run_layer
from llmprune.calibration.collect import collect
from llmprune.model.access import attn_of, decoder_layers
from llmprune.model.device import on_device


def spectrum_entropy(gram: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the normalised eigenvalues of symmetric PSD ``gram [..., d, d]``.

    Returns ``[...]`` float64; a zero matrix has entropy 0. Negative round-off eigenvalues count as 0.
    """
    ev = torch.linalg.eigvalsh(gram.double()).clamp_min(0.0)
    total = ev.sum(-1, keepdim=True)
    p = ev / total.clamp_min(torch.finfo(torch.float64).tiny)
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)


def coordinate_entropy(gram: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the per-coordinate energy ``diag(gram) / trace(gram)``, ``[..., d, d] -> [...]``.

    The same second moment read in the coordinate basis instead of its eigenbasis: low when a few channels carry
    most of the energy (which per-coordinate top-k magnitude pruning keeps), ``log d`` when the channels are
    balanced. Always ``>=`` the matrix entropy of the same matrix.
    """
    diag = torch.diagonal(gram.double(), dim1=-2, dim2=-1).clamp_min(0.0)
    p = diag / diag.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)


def matrix_entropy(x: torch.Tensor) -> float:
    """Matrix entropy of the rows of ``x [n, d]`` (see the module doc): 0 for rank 1, ``log d`` if isotropic."""
    if x.dim() != 2:
        raise ValueError(f"x must be [n, d], got {tuple(x.shape)}")
    x = x.double()
    return float(spectrum_entropy(x.t() @ x / max(1, x.shape[0])))


def effective_rank(x: torch.Tensor) -> float:
    """``exp(matrix_entropy(x))``: between 1 (rank 1) and ``d`` (isotropic)."""
    return math.exp(matrix_entropy(x))


def head_grams(weight: torch.Tensor, gram_x: torch.Tensor, sum_x: torch.Tensor, count: int, head_dim: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head output second moments ``E[y y^T]`` of ``y = W x + b``, from the input moments.

    Args:
        weight: ``[H * head_dim, in]``.
        gram_x: ``sum x x^T`` over the ``count`` inputs, ``[in, in]``.
        sum_x: ``sum x``, ``[in]``.
        count: number of inputs.
        head_dim: rows of ``weight`` per head.
        bias: ``[H * head_dim]`` or None.

    Returns:
        ``[H, head_dim, head_dim]`` float64.
    """
    w = weight.detach().double().reshape(-1, head_dim, weight.shape[-1])  # [H, d, in]
    g = gram_x.double()
    out = w @ g @ w.transpose(1, 2)
    if bias is not None:
        b = bias.detach().double().reshape(-1, head_dim)  # [H, d]
        wsx = w @ sum_x.double()  # [H, d]
        out = out + wsx[:, :, None] * b[:, None, :] + b[:, :, None] * wsx[:, None, :] + count * b[:, :, None] * b[:, None, :]
    return out / max(1, count)


class InputMoments:
    """Accumulator (calibration statistics protocol) of ``sum x x^T`` and ``sum x`` of a linear's inputs, fp64."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram += x.t() @ x
        self.sum += x.sum(0)
        self.count += x.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.gram, self.sum]

    def result(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)


@dataclass
class KVEntropy:
    """Per-layer, per-KV-head matrix entropies (nats) of the keys (pre-RoPE) and values.

    Attributes:
        k: ``k[layer][head]``.
        v: ``v[layer][head]``.
        k_coord, v_coord: the :func:`coordinate_entropy` of the same second moments.
        head_dim: ``d`` (the maximum entropy is ``log d``).
        tokens: calibration tokens per score.
    """

    k: list[list[float]] = field(default_factory=list)
    v: list[list[float]] = field(default_factory=list)
    head_dim: int = 0
    tokens: int = 0
    k_coord: list[list[float]] = field(default_factory=list)
    v_coord: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"k_entropy": self.k, "v_entropy": self.v, "k_coord_entropy": self.k_coord,
                "v_coord_entropy": self.v_coord, "head_dim": self.head_dim, "tokens": self.tokens,
                "max_entropy": math.log(self.head_dim) if self.head_dim else 0.0,
                "keys": "k_proj output (pre-RoPE)", "values": "v_proj output"}


def _head_dim(attn: nn.Module) -> int:
    hd = getattr(attn, "head_dim", None)
    if hd is None:  # pragma: no cover - every supported attention module has it
        raise ValueError(f"{type(attn).__name__} has no head_dim")
    return int(hd)


def _batch(layer: nn.Module, inputs, outs: list, j: int):
    def run() -> None:
        outs[j] = run_layer(layer, inputs, j)

    return run


@torch.no_grad()
def kv_entropy_scores(model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int = 8,
                      progress: bool = False) -> KVEntropy:
    """Matrix entropy of every layer's keys and values per KV head, one decoder layer on ``device`` at a time.

    Args:
        model: a causal LM (dense; any device).
        input_ids: ``[nsamples, seqlen]`` calibration token ids.
        device: where each layer runs.
        batch_size: sequences per forward pass.
        progress: show a progress bar over the layers.
    """
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, input_ids, device, batch_size)
    result = KVEntropy(tokens=int(input_ids.numel()))
    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="kv entropy", unit="layer")
    for i in iterator:
        layer = layers[i]
        with on_device([layer], device):
            attn = attn_of(layer)
            d = _head_dim(attn)
            result.head_dim = d
            acc = InputMoments(attn.k_proj.in_features, device)
            outs: list[torch.Tensor] = [None] * len(inputs)  # type: ignore[list-item]

            # k_proj and v_proj read the same input: one accumulator fed through k_proj's hook.
            collect({"k_proj": attn.k_proj}, {"k_proj": {"moments": acc}},
                    [_batch(layer, inputs, outs, j) for j in range(len(inputs))])
            for name, target, coord in (("k_proj", result.k, result.k_coord), ("v_proj", result.v, result.v_coord)):
                lin = getattr(attn, name)
                grams = head_grams(lin.weight, acc.gram, acc.sum, acc.count, d, lin.bias)
                target.append([float(e) for e in spectrum_entropy(grams).cpu()])
                coord.append([float(e) for e in coordinate_entropy(grams).cpu()])
        inputs.hidden = outs
    return result
