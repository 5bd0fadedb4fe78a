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


def register(name: str, config_cls: type, *, stats: tuple[str, ...] = (), kind: str = "linear") -> Callable:
    """Register a pruning method under ``name`` (decorator)."""
    if kind not in ("linear", "model"):
        raise ValueError(f"unknown method kind {kind!r}")

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = Method(name=name, config_cls=config_cls, fn=fn, stats=tuple(stats), kind=kind)
        return fn

    return deco


def get_method(name: str) -> Method:
    """Look up a registered method; unknown names raise :class:`ConfigError`."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(sorted(_METHODS))})") from None


def method_for_config(config: object) -> Method:
    for method in _METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise ConfigError(f"no method registered for config type {type(config).__name__}")


def available_methods() -> list[str]:
    return sorted(_METHODS)
