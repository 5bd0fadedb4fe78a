"""Magnitude distributions of linear inputs: a uniform sample of ``|x|`` and exact thresholds from it.

TEAL ("Training-Free Activation Sparsity in Large Language Models", Liu et al. 2024) zeroes the entries of a
linear's input whose magnitude is below a per-linear threshold chosen so that a target fraction ``s`` of the
calibration entries falls below it. The threshold is a quantile of the distribution of ``|x|`` over every
entry (token x channel) of the calibration inputs. The full distribution is too big to keep (a 1536-wide input
over 32k tokens is 50M values), so :class:`AbsSample` keeps a *uniform* sample of fixed size (bottom-k
sampling: every value gets a random key and the ``capacity`` smallest keys are kept, which is a uniform sample
without replacement whatever the batch sizes), and :func:`magnitude_threshold` reads the exact quantile of the
sample. While fewer than ``capacity`` values were seen the sample is the full set and the quantile is exact.
"""

from __future__ import annotations

import math

import torch

#: Values of ``|x|`` kept per accumulator by default (4 MiB of fp32).
DEFAULT_CAPACITY = 1 << 20


class AbsSample:
    """Accumulator (calibration statistics protocol) of a uniform sample of ``|x|`` over all entries of the inputs.

    Args:
        capacity: values kept (every value while fewer were seen).
        device: where the sample lives.
        seed: seed of the sampling keys (the sample is deterministic for the same inputs).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, device: torch.device | str = "cpu", seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.values = torch.empty(0, dtype=torch.float32, device=device)
        self.keys = torch.empty(0, dtype=torch.float32, device=device)
        self.count = 0
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._cpu = torch.Generator().manual_seed(seed)  # counts and indices (drawn on the host)

    def add(self, x: torch.Tensor) -> None:
        """Add every entry of ``x`` (``[..., in]``, any float dtype)."""
        flat = x.detach().reshape(-1)
        n = flat.numel()
        self.count += n
        if self.values.numel() >= self.capacity:
            # Full: a value enters only if its key is below the current k-th key ``kmax``. Instead of drawing
            # ``n`` keys, draw how many enter (Binomial(n, kmax)), which ones, and their keys (uniform below
            # kmax): the same distribution at O(entering) cost (indices drawn with replacement; repeats are
            # dropped, a bias of order entering^2 / n).
            kmax = float(self.keys.max())
            c = int(torch.binomial(torch.tensor(float(n)), torch.tensor(kmax), generator=self._cpu))
            idx = torch.randint(0, n, (c,), generator=self._cpu).unique().to(flat.device)
            v = flat[idx].abs().float().to(self.values.device)
            keys = torch.rand(v.numel(), generator=self._gen, device=self.values.device) * kmax
        else:
            v = flat.abs().float().to(self.values.device)
            keys = torch.rand(n, generator=self._gen, device=v.device)
        values = torch.cat([self.values, v])
        keys = torch.cat([self.keys, keys])
        if values.numel() > self.capacity:
            keys, idx = torch.topk(keys, self.capacity, largest=False, sorted=False)
            values = values[idx]
        self.values, self.keys = values, keys

    def tensors(self) -> list[torch.Tensor]:
        return [self.values]

    def result(self) -> torch.Tensor:
        """The sample, sorted ascending: ``[min(count, capacity)]`` fp32."""
        return torch.sort(self.values).values


def magnitude_threshold(sorted_abs: torch.Tensor, sparsity: float) -> float:
    """The threshold ``t`` at which zeroing ``|x| < t`` removes a fraction ``sparsity`` of the sample.

    With ``k = round(sparsity * n)`` of the ``n`` sorted values: ``t = 0`` for ``k = 0`` (nothing zeroed),
    ``t = inf`` for ``k = n`` (everything), else ``t = sorted_abs[k]``, the smallest kept value, so exactly the
    ``k`` smallest values lie below it (fewer when values tie at the boundary).

    Args:
        sorted_abs: ``[n]`` non-negative values sorted ascending (:meth:`AbsSample.result`).
        sparsity: in ``[0, 1]``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    n = sorted_abs.numel()
    if n == 0:
        raise ValueError("no calibration values: the sample is empty")
    k = min(n, max(0, int(math.floor(sparsity * n + 0.5))))
    if k == 0:
        return 0.0
    if k == n:
        return math.inf
    return float(sorted_abs[k])


def threshold_table(sorted_abs: torch.Tensor, points: int) -> torch.Tensor:
    """Thresholds at the sparsities ``j / points`` for ``j = 0..points``: ``[points + 1]`` fp32 (last = inf)."""
    return torch.tensor([magnitude_threshold(sorted_abs, j / points) for j in range(points + 1)],
                        dtype=torch.float32)
