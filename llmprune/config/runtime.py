"""Inference-time options (:class:`RuntimeConfig`): one object for every entry point."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmprune.config.base import build
from llmprune.errors import ConfigError

#: Recent tokens the bitmap KV cache keeps dense unless told otherwise (one definition for every entry point).
DEFAULT_KV_WINDOW = 32


def _runtime_field(flag: str, help: str, kind: type = float, metavar: str = "FRACTION") -> Any:
    """A :class:`RuntimeConfig` field (default None) with its command-line flag and help in the metadata."""
    return field(default=None, metadata={"flag": flag, "help": help, "type": kind, "metavar": metavar})


def _yes_no(value: str) -> bool:
    """A command-line boolean: yes/no, true/false, on/off, 1/0 (argparse ``type``)."""
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {value!r}")


def _check_fraction(flag: str, source: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{flag} must be in [0, 1), got {value!r} (runtime.{source})")
    return float(value)


@dataclass
class RuntimeConfig:
    """Inference-time options a checkpoint is meant to be run with: one object for every entry point.

    Built the same way from a recipe's ``runtime`` section, from a checkpoint's ``llmprune.json``
    (``recipe.runtime``) and from the command-line flags (each field's metadata names its flag and help;
    see :mod:`llmprune.runtime.options`). Recorded in the checkpoint metadata and model card. Errors name the
    flag and the field, e.g. ``--k-sparsity must be in [0, 1), got 1.5 (runtime.kv_sparsity)``.

    Attributes:
        kv_sparsity: fraction of every cached K and V vector pruned per token (bitmap KV cache), or None.
        attn_sparsity: fraction of KV blocks skipped by learned attention gates, or None.
        kv_k_sparsity, kv_v_sparsity: separate K / V sparsity (override ``kv_sparsity``), or None.
        kv_window: recent tokens the bitmap KV cache keeps dense (default :data:`DEFAULT_KV_WINDOW`), or None.
        gates: directory of attention gates saved by ``llmprune train-gates`` to attach, or None.
        kv_allocation: per-layer / per-KV-head KV budgets: the path of a ``kv_budgets.json`` written by
            ``llmprune calibrate-kv`` (relative paths in a checkpoint's ``llmprune.json`` are relative to the
            checkpoint), or ``"uniform"`` (the default: every layer and head at the same sparsity), or None.
            With a path alone the cache runs at the file's mean sparsities; given sparsities must equal them.
        act_sparsity: model-level activation sparsity (TEAL) of the decoder linears' inputs, or None (with a
            thresholds file alone: the file's calibrated level).
        act_prefill: also sparsify multi-token (prefill) forwards, or None (no: decode steps only).
        act_thresholds: ``act_thresholds.json`` from ``llmprune calibrate-act`` (relative paths in a checkpoint's
            ``llmprune.json`` are relative to the checkpoint), or None.
    """

    #: Fields of the bitmap KV cache and of the attention gates; a source that sets any field of a group
    #: replaces that whole group of the source below it (see :meth:`override`). Every field is in one group.
    KV_FIELDS: ClassVar[tuple[str, ...]] = ("kv_sparsity", "kv_k_sparsity", "kv_v_sparsity", "kv_window",
                                            "kv_allocation")
    ATTN_FIELDS: ClassVar[tuple[str, ...]] = ("attn_sparsity", "gates")
    #: Activation sparsity (TEAL): each field is its own group, so ``--act-sparsity 0.4`` keeps a checkpoint's
    #: thresholds file and ``--act-prefill`` keeps its level.
    ACT_FIELDS: ClassVar[tuple[str, ...]] = ("act_sparsity", "act_prefill", "act_thresholds")
    GROUPS: ClassVar[tuple[tuple[str, ...], ...]] = (KV_FIELDS, ATTN_FIELDS) + tuple((n,) for n in ACT_FIELDS)

    kv_sparsity: float | None = _runtime_field(
        "--kv-sparsity", "prune this fraction of every cached K and V vector per token (bitmap KV cache), e.g. 0.7")
    attn_sparsity: float | None = _runtime_field(
        "--attn-sparsity", "learned attention gates: fraction of KV blocks skipped")
    kv_k_sparsity: float | None = _runtime_field("--k-sparsity", "key sparsity (overrides --kv-sparsity for K)")
    kv_v_sparsity: float | None = _runtime_field("--v-sparsity", "value sparsity (overrides --kv-sparsity for V)")
    kv_window: int | None = _runtime_field(
        "--kv-window", f"with the bitmap KV cache: recent tokens kept dense (default {DEFAULT_KV_WINDOW})", int, "TOKENS")
    gates: str | None = _runtime_field(
        "--gates", "attach the attention gates saved by llmprune train-gates in DIR", str, "DIR")
    kv_allocation: str | None = _runtime_field(
        "--kv-allocation", "bitmap KV cache budgets per layer and KV head: a kv_budgets.json (or its directory) "
        "from llmprune calibrate-kv, or 'uniform' (default)", str, "PATH")
    act_sparsity: float | None = _runtime_field(
        "--act-sparsity", "activation sparsity (TEAL): zero this model-level fraction of every decoder linear's "
        "input entries at decode, by calibrated magnitude thresholds (llmprune calibrate-act), e.g. 0.4")
    act_prefill: bool | None = _runtime_field(
        "--act-prefill", "with activation sparsity: sparsify prefill (multi-token) forwards too (default no)",
        _yes_no, "yes|no")
    act_thresholds: str | None = _runtime_field(
        "--act-thresholds", "activation thresholds: an act_thresholds.json (or its directory) from llmprune "
        "calibrate-act (default: the checkpoint's)", str, "PATH")

    def __post_init__(self) -> None:
        flag = {f.name: f.metadata["flag"] for f in dataclasses.fields(self)}
        for name in ("kv_k_sparsity", "kv_v_sparsity"):  # the values the cache gets, named by their own flags
            source = name if getattr(self, name) is not None else "kv_sparsity"
            if getattr(self, source) is not None:
                _check_fraction(flag[name], source, getattr(self, source))
        for name in ("kv_sparsity", "attn_sparsity"):
            if getattr(self, name) is not None:
                _check_fraction(flag[name], name, getattr(self, name))
        if self.kv_allocation is not None:
            if not isinstance(self.kv_allocation, (str, os.PathLike)) or not str(self.kv_allocation):
                raise ConfigError(f"--kv-allocation must be 'uniform' or a path, got {self.kv_allocation!r} "
                                  "(runtime.kv_allocation)")
            self.kv_allocation = str(self.kv_allocation)
            if self.kv_allocation == "uniform" and not self.kv_enabled:
                raise ConfigError("--kv-allocation uniform needs --kv-sparsity (or --k-sparsity/--v-sparsity) "
                                  "(runtime.kv_allocation)")
        if self.kv_window is not None:
            w = self.kv_window
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ConfigError(f"--kv-window must be an integer >= 1, got {w!r} (runtime.kv_window)")
            if not self.kv_enabled:
                raise ConfigError("--kv-window needs --kv-sparsity (or --k-sparsity/--v-sparsity or "
                                  "--kv-allocation FILE) (runtime.kv_window)")
        if self.act_sparsity is not None:
            _check_fraction(flag["act_sparsity"], "act_sparsity", self.act_sparsity)
        if self.act_prefill is not None and not isinstance(self.act_prefill, bool):
            raise ConfigError(f"--act-prefill must be yes or no, got {self.act_prefill!r} (runtime.act_prefill)")
        if self.act_thresholds is not None:
            if not isinstance(self.act_thresholds, (str, os.PathLike)) or not str(self.act_thresholds):
                raise ConfigError(f"--act-thresholds must be a path, got {self.act_thresholds!r} "
                                  "(runtime.act_thresholds)")
            self.act_thresholds = str(self.act_thresholds)
        if self.gates is not None:
            if not isinstance(self.gates, (str, os.PathLike)) or not str(self.gates):
                raise ConfigError(f"--gates must be a directory, got {self.gates!r} (runtime.gates)")
            self.gates = str(self.gates)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "runtime") -> RuntimeConfig:
        """A config from a recipe-style mapping (a checkpoint's ``recipe.runtime``), rejecting unknown keys.

        Raises:
            ConfigError: naming ``where`` and the bad key or value.
        """
        return build(cls, data, where)

    @property
    def kv_enabled(self) -> bool:
        """True when the bitmap KV cache is on (a K or V sparsity, or a budgets file, is set)."""
        if self.kv_allocation is not None and self.kv_allocation != "uniform":
            return True
        return any(getattr(self, n) is not None for n in ("kv_sparsity", "kv_k_sparsity", "kv_v_sparsity"))

    @property
    def attn_enabled(self) -> bool:
        """True when attention gates are requested (a sparsity or a gates directory)."""
        return self.attn_sparsity is not None or self.gates is not None

    def kv_cache_settings(self) -> dict[str, Any] | None:
        """Resolved ``{"k_sparsity", "v_sparsity", "window"}`` for the bitmap KV cache, or None (dense cache).

        K and V fall back to ``kv_sparsity``, then to 0 when only the other one is set; the window to
        :data:`DEFAULT_KV_WINDOW`. With a budgets file (``kv_allocation``) the dict also has ``"allocation"``
        (the path), and K / V are None when no sparsity is given (the cache takes the file's means).
        """
        if not self.kv_enabled:
            return None
        k = self.kv_k_sparsity if self.kv_k_sparsity is not None else self.kv_sparsity
        v = self.kv_v_sparsity if self.kv_v_sparsity is not None else self.kv_sparsity
        window = self.kv_window if self.kv_window is not None else DEFAULT_KV_WINDOW
        out: dict[str, Any] = {"k_sparsity": float(k or 0.0), "v_sparsity": float(v or 0.0), "window": window}
        if self.kv_allocation is not None and self.kv_allocation != "uniform":
            given = any(getattr(self, n) is not None for n in ("kv_sparsity", "kv_k_sparsity", "kv_v_sparsity"))
            if not given:
                out["k_sparsity"] = out["v_sparsity"] = None
            out["allocation"] = self.kv_allocation
        return out

    def override(self, other: RuntimeConfig) -> RuntimeConfig:
        """``self`` with ``other`` on top, group by group: a group ``other`` sets any field of is taken from it.

        So ``--kv-sparsity 0.3`` replaces a checkpoint's ``kv_k_sparsity``/``kv_window`` too (it does not mix
        with them), while leaving the checkpoint's attention-gate settings in place.
        """
        values = dataclasses.asdict(self)
        for group in self.GROUPS:
            if any(getattr(other, n) is not None for n in group):
                values.update({n: getattr(other, n) for n in group})
        return RuntimeConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
