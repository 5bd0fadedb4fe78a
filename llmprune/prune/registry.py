"""Explicit method registry: ``@register("wanda", WandaConfig, stats=...)``.

Two kinds of methods plug in:

* ``"linear"``: ``fn(weight, stats, config) -> (new_weight, keep_mask)`` on one
  ``nn.Linear`` weight ``[out, in]``; the layer-by-layer driver collects the
  statistics named in ``stats`` (see :mod:`llmprune.calibration.stats`) and
  calls ``fn`` for each linear of each decoder layer.
* ``"model"``: ``fn(model, config, ctx) -> list[ModuleReport]`` for methods that
  change shapes or need whole-block signals (structured pruning). ``ctx`` is a
  :class:`llmprune.api.PruneContext` (calibration ids, device, progress).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmprune._registration import ensure_registered
from llmprune.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    fn: Callable
    stats: tuple[str, ...] = ()
    kind: str = "linear"

    @property
    def needs_calibration(self) -> bool:
        return bool(self.stats) or self.kind == "model"


_METHODS: dict[str, Method] = {}


def register(
    name: str,
    config_cls: type,
    fn: Callable | None = None,
    *,
    stats: tuple[str, ...] = (),
    kind: str = "linear",
) -> Callable:
    """Register a pruning method under ``name``: ``register(name, Config, fn)`` or as a decorator.

    ``config_cls.method`` must be ``name`` (a config class that does not name its method yet gets it).
    Built-in methods are registered in one place, :mod:`llmprune.builtins`.
    """
    if kind not in ("linear", "model"):
        raise ValueError(f"unknown method kind {kind!r}")
    declared = getattr(config_cls, "method", "")
    if declared and declared != name:
        raise ValueError(f"{config_cls.__name__}.method is {declared!r}, not {name!r}")

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if not declared:
            config_cls.method = name
        _METHODS[name] = Method(name=name, config_cls=config_cls, fn=fn, stats=tuple(stats), kind=kind)
        return fn

    return deco if fn is None else deco(fn)


def get_method(name: str) -> Method:
    """Look up a registered method; unknown names raise :class:`ConfigError`."""
    ensure_registered(methods_only=True)  # the methods register on first use (`import llmprune` stays light)
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(sorted(_METHODS))})") from None


def method_for_config(config: object) -> Method:
    """The method a config belongs to (by its ``method`` name)."""
    ensure_registered(methods_only=True)
    method = _METHODS.get(getattr(config, "method", ""))
    if method is None or not isinstance(config, method.config_cls):
        raise ConfigError(f"no method registered for config type {type(config).__name__}")
    return method


def available_methods() -> list[str]:
    ensure_registered(methods_only=True)
    return sorted(_METHODS)
