"""The in-launch split combine shared by the decode-attention kernels (``@triton.jit`` helper, inlined).

Each split program of a KV head stores its unnormalised partial for ``ROWS`` query rows as
``[m (ROWS), l (ROWS), acc (ROWS x D)]`` fp32; the last program to arrive merges them row by row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_partial_row(parts, p_ok, row, ROWS: tl.constexpr, D: tl.constexpr, offs_d):
    """Log-sum-exp merge of one query row over the stored partials.

    Args:
        parts: ``[P]`` pointers to the partial records of the head's split programs.
        p_ok: ``[P]`` which of them exist.
        row: the query row to merge.
        ROWS, D: rows per record and head dim (the record layout above).
        offs_d: ``[D]`` ``arange(0, D)``.

    Returns:
        ``(numerator [D], denominator)``: the row's output is ``numerator / denominator`` (the caller guards an
        empty denominator as its kernel defines).
    """
    m_p = tl.load(parts + row, mask=p_ok, other=float("-inf"), cache_modifier=".cg")
    l_p = tl.load(parts + ROWS + row, mask=p_ok, other=0.0, cache_modifier=".cg")
    a_p = tl.load(parts[:, None] + 2 * ROWS + row * D + offs_d[None, :], mask=p_ok[:, None], other=0.0,
                  cache_modifier=".cg")
    m_max = tl.max(m_p, 0)
    w = tl.exp2(m_p - tl.where(m_max == float("-inf"), 0.0, m_max))
    return tl.sum(w[:, None] * a_p, 0), tl.sum(w * l_p, 0)
