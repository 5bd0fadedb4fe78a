"""Triton kernels, importable as ``llmprune.kernels``.

Each kernel module holds ``_<op>_kernel`` (``@triton.jit``), an ``<op>()`` launcher
that validates shapes/dtypes/contiguity and allocates the output, and
``<op>_ref()`` in plain torch. On CPU, set ``TRITON_INTERPRET=1`` to run the
kernels through Triton's interpreter (tests do this).
"""
