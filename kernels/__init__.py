"""Triton kernels, importable as ``llmprune.kernels``.

Each kernel module holds ``_<op>_kernel`` (``@triton.jit``), an ``<op>()`` launcher
that validates shapes/dtypes/contiguity and allocates the output, and
``<op>_ref()`` in plain torch. Kernels are leaves: they import only torch, triton
and the byte layouts (:mod:`llmprune.formats.sparse24`, :mod:`llmprune.formats.bitmap`);
whether a kernel runs is decided by :mod:`llmprune.runtime.kernel_policy`.

On CPU, set ``TRITON_INTERPRET=1`` before a kernel module is imported (``@triton.jit``
reads it then) to run the kernels through Triton's interpreter (tests do this).
"""
