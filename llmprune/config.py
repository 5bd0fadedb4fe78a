"""Config dataclasses shared by the Python API, the CLI and YAML recipes.

Every config validates itself in ``__post_init__`` and raises
:class:`~llmprune.errors.ConfigError` naming the bad field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmprune.errors import ConfigError
from llmprune.sparsity import SparsityPattern

#: Recent tokens the bitmap KV cache keeps dense unless told otherwise (one definition for every entry point).
DEFAULT_KV_WINDOW = 32


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ConfigError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of module-name patterns, got {value!r}")
    return tuple(value)


def build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of: {', '.join(names)})")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass
class PruneConfig:
    """Base of every method config.

    Attributes:
        sparsity: ``"2:4"``-style N:M or a ratio in (0, 1).
        ignore: extra module-name patterns (fnmatch) left dense; ``lm_head`` and
            embeddings are never pruned.
    """

    #: Name of the registered method this config belongs to (set by each method's config class).
    method: ClassVar[str] = ""

    sparsity: SparsityPattern | str | float = "2:4"
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.sparsity = SparsityPattern.parse(self.sparsity)
        self.ignore = check_patterns("ignore", self.ignore)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = str(self.sparsity)
        out["ignore"] = list(self.ignore)
        return out


@dataclass
class CalibConfig:
    """Calibration data.

    Attributes:
        source: ``"auto"`` (C4 from the Hub when reachable, else ``"self"``),
            ``"c4"``, ``"wikitext2"``, ``"self"`` (text sampled from the model),
            a local ``.txt``/``.jsonl``/``.json``/``.parquet`` file, or any
            ``datasets`` name.
        dataset_config: ``datasets`` config name (for Hub datasets).
        split: dataset split.
        text_field: column holding the text.
        nsamples: number of calibration sequences.
        seqlen: tokens per sequence (clipped to the model's context).
        seed: sampling seed.
        batch_size: sequences per forward pass in the layer-by-layer driver.
    """

    #: Bounds on the sizes (the activations they imply are checked against the memory before any work).
    MAX_NSAMPLES: ClassVar[int] = 1_000_000
    MAX_SEQLEN: ClassVar[int] = 10_000_000

    source: str = "auto"
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"calibration source must be a non-empty string, got {self.source!r}")
        check_int("nsamples", self.nsamples)
        check_int("seqlen", self.seqlen, minimum=2)
        check_int("seed", self.seed, minimum=0)
        check_int("batch_size", self.batch_size)
        for name, limit in (("nsamples", self.MAX_NSAMPLES), ("seqlen", self.MAX_SEQLEN), ("batch_size", self.MAX_NSAMPLES)):
            if getattr(self, name) > limit:
                raise ConfigError(f"{name} must be at most {limit:,}, got {getattr(self, name):,}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: ``save.dtype`` values (``auto``: the dtype the model was loaded in).
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SaveConfig:
    """How the checkpoint is written.

    Attributes:
        format: on-disk format name (see :mod:`llmprune.formats.checkpoint`); ``"dense"``
            loads in plain transformers.
        dtype: dtype of the saved weights: ``"auto"`` (the dtype the model was loaded in), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
    """

    format: str = "dense"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or not self.format:
            raise ConfigError(f"save.format must be a format name, got {self.format!r}")
        if self.dtype not in SAVE_DTYPES:
            raise ConfigError(f"save.dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


@dataclass
class RecoveryConfig:
    """Recovery after a per-linear prune stage that keeps the sparsity pattern (:mod:`llmprune.recover`).

    Attributes:
        mode: ``"block"``: inside the layer-by-layer engine, each pruned decoder block's kept weights are
            optimized (Adam) so its outputs match the dense block's on the block's calibration inputs;
            ``"e2e"``: the whole sparse model is distilled from the dense one (logit KL, optional hidden MSE).
        scope: block mode: ``"separate"`` (attention against the dense attention output, then the MLP against
            the dense block output) or ``"whole"`` (all linears of the block at once).
        mask: ``"fixed"`` (the pruned entries stay zero) or ``"learn"`` (N:M only: SR-STE with progressive
            gradient flow; the pattern is re-selected from straight-through dense weights every step).
        steps: Adam steps per reconstructed part (block) or in total (e2e).
        lr: peak Adam learning rate (cosine decay towards 0).
        batch_size: calibration sequences per step.
        decay: ``learn``: SR-STE decay on the pruned entries (added to their gradient, times the weight).
        flow: ``learn``: gradient factor reaching the pruned entries at the first step, decaying linearly to 0.
        hidden_weight: ``e2e``: weight of the per-layer hidden-state MSE next to the logit KL (0 = KL only).
        temperature: ``e2e``: softmax temperature of the logit KL.
        eval_batches: the losses reported before/after each block part are measured on the first this many
            calibration batches (0: all; each measurement is a forward pass over them).
    """

    MODES: ClassVar[tuple[str, ...]] = ("block", "e2e")
    SCOPES: ClassVar[tuple[str, ...]] = ("separate", "whole")
    MASKS: ClassVar[tuple[str, ...]] = ("fixed", "learn")

    mode: str = "block"
    scope: str = "separate"
    mask: str = "fixed"
    steps: int = 128
    lr: float = 2e-4
    batch_size: int = 1
    decay: float = 2e-4
    flow: float = 1.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    eval_batches: int = 2

    def __post_init__(self) -> None:
        for name, allowed in (("mode", self.MODES), ("scope", self.SCOPES), ("mask", self.MASKS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"recover.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_int("recover.steps", self.steps)
        check_float("recover.lr", self.lr, 1e-10, 1.0)
        check_int("recover.batch_size", self.batch_size)
        check_float("recover.decay", self.decay, 0.0, 1.0)
        check_float("recover.flow", self.flow, 0.0, 1.0)
        check_float("recover.hidden_weight", self.hidden_weight, 0.0, 1e6)
        check_float("recover.temperature", self.temperature, 1e-3, 1e3)
        check_int("recover.eval_batches", self.eval_batches, minimum=0)
        if self.mode == "e2e" and self.mask == "learn":
            raise ConfigError("recover.mask: learn is only available with mode block (e2e keeps the mask fixed)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Recipe:
    """A full compression recipe: ordered prune stages + calibration + save + runtime (+ recovery)."""

    stages: list[PruneConfig] = field(default_factory=list)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recover: RecoveryConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "prune": [{"method": s.method, **s.to_dict()} for s in self.stages],
            "calibration": self.calibration.to_dict(),
            "save": self.save.to_dict(),
            "runtime": self.runtime.to_dict(),
        }
        if self.recover is not None:  # absent when off, so recipes without recovery read as before
            out["recover"] = self.recover.to_dict()
        return out
