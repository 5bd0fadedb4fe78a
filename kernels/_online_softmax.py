"""Online-softmax steps of a decode-attention kernel (``@triton.jit`` helpers, inlined into the caller).

Flash-attention's running max / running sum over key blocks (Dao et al., 2022, https://arxiv.org/abs/2205.14135),
in base 2 (``qk_scale`` includes ``log2(e)``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scores(q, k, s_ok, m_i, l_i, qk_scale, MASKED: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax step over one block: ``(p [R, BLOCK_N], alpha [R], m_new, l_new)`` (``exp2``, fp32)."""
    if DOT_FP32:
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        s = tl.where(s_ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:  # a row may have seen nothing yet (left padding): keep exp2 finite
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def accumulate(acc, p, alpha, v, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """``acc [R, d]`` rescaled by ``alpha [R]`` plus ``p [R, BLOCK_N] @ v [BLOCK_N, d]`` (fp32 accumulation)."""
    if DOT_FP32:
        v = v.to(tl.float32)
    if IEEE:
        return acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
