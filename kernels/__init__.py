"""Triton kernels, importable as ``llmprune.kernels``.

Each kernel module holds ``_<op>_kernel`` (``@triton.jit``), an ``<op>()`` launcher
that validates shapes/dtypes/contiguity and allocates the output, and
``<op>_ref()`` in plain torch. Kernels are leaves: they import only torch, triton
and the byte layouts (:mod:`llmprune.formats.sparse24`, :mod:`llmprune.formats.bitmap`);
whether a kernel runs is decided by :mod:`llmprune.runtime.kernel_policy`.

On CPU, set ``TRITON_INTERPRET=1`` before a kernel module is imported (``@triton.jit``
reads it then) to run the kernels through Triton's interpreter (tests do this).
"""

if __name__ == "kernels":
    # Started from a checkout (``python -m ...`` puts the repository root on sys.path), this folder shadows the PyPI
    # package ``kernels`` that transformers (>= 5.25 depends on it) imports while loading any model class. Load that
    # package in this module's place, so ``import kernels`` means the same thing inside and outside a checkout.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    )
    if _spec is None or _spec.loader is None:
        raise ImportError("No module named 'kernels' (this checkout's kernels/ is llmprune.kernels)", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import system returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_module)
