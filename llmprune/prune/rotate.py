"""Pure tensor cores of SliceGPT: PCA bases, norm folding, rotating and slicing weights.

SliceGPT (Ashkboos et al., 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
https://arxiv.org/abs/2401.15024) rests on *computational invariance*: once every RMSNorm is scale-free
(its scale folded into the linears that read it) an orthogonal ``Q`` applied to the residual stream and undone in
the weights that read and write it leaves the network's function unchanged, because ``||x Q|| = ||x||``.
LayerNorm becomes such an RMSNorm after the mean subtraction is folded into every matrix that *writes* the
residual stream (the paper's Appendix A.1). Choosing ``Q`` as the principal components of the block inputs and
deleting the last columns of ``Q`` then removes the least-variance directions of the residual stream.

Conventions (row vectors, as torch applies ``nn.Linear``): a hidden state ``h`` is ``[..., d]``; a linear computes
``h W^T + b`` with ``W`` ``[out, in]``. Rotating the residual into basis ``Q`` (``[d, d]``, orthogonal) means
``h' = h Q``; sliced to ``k`` dimensions, ``h' = h Q[:, :k]``.

Every function here is tensors in, tensors out (no modules, no devices chosen).
"""

from __future__ import annotations

import torch

from llmprune.errors import ConfigError


def sliced_dim(hidden: int, sparsity: float, round_to: int = 8) -> int:
    """The residual width kept when a fraction ``sparsity`` of ``hidden`` is sliced away.

    ``int(hidden * (1 - sparsity))`` rounded *down* to a multiple of ``round_to`` (hardware-friendly shapes;
    the paper rounds the same way), never above ``hidden``.

    Raises:
        ConfigError: when the kept width would be 0.
    """
    keep = int(hidden * (1.0 - sparsity) + 1e-9)
    keep -= keep % round_to
    if keep <= 0:
        raise ConfigError(f"sparsity {sparsity:g} of hidden size {hidden} with round_to {round_to} leaves no "
                          "dimension to keep; choose a smaller sparsity or round_to")
    return min(keep, hidden)


def pca_basis(xtx: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of the rows of ``X`` from ``X^T X``.

    Args:
        xtx: ``[d, d]`` symmetric ``X^T X`` (any float dtype; computed in float64).
        damp: added to the diagonal as a fraction of its mean, for a well-conditioned ``eigh`` (this shifts
            every eigenvalue by the same amount and leaves the eigenvectors unchanged).

    Returns:
        ``(eigenvalues [d], Q [d, d])``, eigenvalues descending, ``Q[:, i]`` the unit eigenvector of the ``i``-th,
        each column's sign fixed so its largest-magnitude entry is positive (deterministic bases).
    """
    h = xtx.double()
    h = (h + h.T) / 2
    if damp > 0:
        h = h + damp * h.diagonal().mean().clamp_min(1e-30) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    vals, vecs = torch.linalg.eigh(h)
    order = torch.argsort(vals, descending=True)
    vals, vecs = vals[order] - (damp * xtx.double().diagonal().mean() if damp > 0 else 0.0), vecs[:, order]
    pivot = vecs.abs().argmax(0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1], device=vecs.device)])
    signs[signs == 0] = 1
    return vals, vecs * signs


def random_orthogonal(d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random orthogonal ``[d, d]`` matrix (QR of a Gaussian, signs fixed): for invariance tests."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def fold_norm(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
              shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a norm's elementwise affine ``n * scale + shift`` into the linear that reads it.

    ``(n * scale + shift) W^T + b = n (W diag(scale))^T + (shift W^T + b)``.

    Args:
        weight: ``[out, d]``; bias: ``[out]`` or None.
        scale: ``[d]`` (RMSNorm / LayerNorm weight); shift: ``[d]`` (LayerNorm bias) or None.

    Returns:
        ``(new weight [out, d], new bias [out] or None)`` in float64.
    """
    w = weight.double()
    new_w = w * scale.double().unsqueeze(0)
    new_b = bias.double() if bias is not None else None
    if shift is not None:
        extra = w @ shift.double()
        new_b = extra if new_b is None else new_b + extra
    return new_w, new_b


def center_output(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make a linear's outputs mean-free across their ``d`` features: ``W <- M W``, ``b <- b M``,
    ``M = I - 11^T / d`` (folds LayerNorm's mean subtraction into the matrices that write the residual).

    Args:
        weight: ``[d, in]`` (a linear writing the residual stream); bias ``[d]`` or None.
    """
    w = weight.double()
    new_b = None if bias is None else bias.double() - bias.double().mean()
    return w - w.mean(0, keepdim=True), new_b


def center_rows(table: torch.Tensor) -> torch.Tensor:
    """An embedding table ``[n, d]`` whose rows are mean-free (the same fold for embeddings)."""
    t = table.double()
    return t - t.mean(1, keepdim=True)


def rotate_input(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear that reads the rotated (and possibly sliced) residual ``h Q`` (``q``: ``[d, k]``).

    ``h W^T = (h Q)(W Q)^T`` when ``Q`` is orthogonal; with ``k < d`` columns, the input is sliced.

    Args:
        weight: ``[out, d]``. Returns ``[out, k]`` (float64).
    """
    return weight.double() @ q.double()


def rotate_output(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear that writes the rotated (and possibly sliced) residual: outputs ``y Q`` (``q``: ``[d, k]``).

    Args:
        weight: ``[d, in]``; bias ``[d]`` or None. Returns ``(Q^T W [k, in], b Q [k] or None)`` (float64).
    """
    w = q.double().T @ weight.double()
    return w, None if bias is None else bias.double() @ q.double()


def rotate_embedding(table: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Embedding rows written into the rotated residual: ``E Q`` (``[n, d] @ [d, k] -> [n, k]``, float64)."""
    return table.double() @ q.double()


def shortcut(q_from: torch.Tensor, q_to: torch.Tensor) -> torch.Tensor:
    """The residual-shortcut matrix between two bases: ``Q_from^T Q_to`` (``[k1, k2]`` for sliced ``[d, k]``
    bases), so a skip connection carrying ``h Q_from`` delivers ``h Q_from Q_from^T Q_to ~ h Q_to``."""
    return q_from.double().T @ q_to.double()
