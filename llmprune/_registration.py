"""The built-ins are registered on first use, so ``import llmprune`` stays light (no torch, no transformers).

``import llmprune`` promises that ``AutoModelForCausalLM.from_pretrained`` reads llmprune's checkpoints
(per-layer-size model types, the packed 2:4 quantizer): those hooks are registered into transformers. Importing
transformers takes seconds, so the package does not import it; instead the registrar (set by
``llmprune/__init__.py``: :func:`llmprune.builtins.register_builtins`) runs

* at once, when transformers is already imported when llmprune is;
* right after transformers is imported, by anyone (:class:`_AfterImport`, a ``sys.meta_path`` finder); when
  that import happens inside an llmprune module that is itself being imported, registration waits until the
  outermost llmprune import has finished (registering halfway would import half-initialised modules);
* on the first lookup in a registry (:func:`ensure_registered`, called by ``get_method``, ``get_format`` ...).

This module imports only the standard library: it sits at the bottom of the stages.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType

_TRIGGER = "transformers"
_lock = threading.RLock()
_registrar: Callable[[], None] | None = None
_methods_registrar: Callable[[], None] | None = None
_methods_state = "idle"  # -> "running" -> "done"
_done = False
_running = False
_pending = False  # transformers was imported while an llmprune module was half-imported
_depth = 0  # llmprune modules being executed right now (through the finder)


def set_registrar(fn: Callable[[], None], methods: Callable[[], None] | None = None) -> None:
    """Set the function that registers the built-ins, and the one that registers only the methods (cheaper: no
    transformers) for method lookups (called once by ``llmprune/__init__.py``)."""
    global _registrar, _methods_registrar
    _registrar, _methods_registrar = fn, methods


def ensure_registered(methods_only: bool = False) -> None:
    """Run the registrar once (no-op afterwards, and while it runs: registries call this on every lookup).

    ``methods_only``: the method registry asks; the methods alone are registered when that registrar is set.
    """
    global _done, _running, _methods_state
    if _done or _registrar is None:
        return
    if methods_only and _methods_registrar is not None:
        if _methods_state == "done":
            return
        with _lock:
            if _methods_state == "idle":
                _methods_state = "running"
                try:
                    _methods_registrar()
                    _methods_state = "done"
                finally:
                    if _methods_state == "running":
                        _methods_state = "idle"
        return
    with _lock:  # other threads wait until the built-ins are in; the registering thread re-enters as a no-op
        if _done or _running:
            return
        _running = True
        try:
            _registrar()
            _done = True
        finally:
            _running = False
    uninstall()


def is_registered() -> bool:
    return _done


class _Loader(importlib.abc.Loader):
    """Wraps a module's loader: counts llmprune module executions and notices when transformers is in."""

    def __init__(self, inner: importlib.abc.Loader, trigger: bool) -> None:
        self._inner, self._trigger = inner, trigger

    def create_module(self, spec):  # noqa: D102 - the inner loader's
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:  # noqa: D102
        global _depth, _pending
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:  # the module sees its real loader (resources, get_source)
            spec.loader = self._inner
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._inner
        with _lock:
            _depth += not self._trigger
        try:
            self._inner.exec_module(module)
        finally:
            with _lock:
                _depth -= not self._trigger
        with _lock:
            _pending = _pending or self._trigger
            run = _pending and _depth == 0
            if run:
                _pending = False
        if run:
            ensure_registered()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of ``transformers`` and ``llmprune.*`` found by the other finders."""

    def find_spec(self, name: str, path=None, target=None):  # noqa: D102
        if _done or not (name == _TRIGGER or name.startswith("llmprune.")):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, trigger=name == _TRIGGER)
        return spec


_FINDER = _AfterImport()


def install() -> None:
    """Register now if transformers is already imported, else when it is (see the module docstring)."""
    if _TRIGGER in sys.modules:
        ensure_registered()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the import hook (done once the built-ins are registered)."""
    try:
        sys.meta_path.remove(_FINDER)
    except ValueError:
        pass
