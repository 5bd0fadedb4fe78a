"""Config dataclasses shared by the Python API, the CLI and YAML recipes.

Every config validates itself in ``__post_init__`` and raises
:class:`~llmprune.errors.ConfigError` naming the bad field.
"""

from __future__ import annotations

import dataclasses
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SaveConfig:
    """How the checkpoint is written.

    Attributes:
        format: on-disk format name (see :mod:`llmprune.formats.checkpoint`); ``"dense"``
            loads in plain transformers.
    """

    format: str = "dense"

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or not self.format:
            raise ConfigError(f"save.format must be a format name, got {self.format!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RuntimeConfig:
    """Inference-time options a checkpoint is meant to be run with.

    Recorded in the checkpoint metadata and model card.

    Attributes:
        kv_sparsity: fraction of K/V entries pruned per token (bitmap KV cache), or None.
        attn_sparsity: fraction of KV blocks skipped by learned gates, or None.
        kv_k_sparsity, kv_v_sparsity: separate K / V sparsity (override ``kv_sparsity``), or None.
        kv_window: recent tokens the bitmap KV cache keeps dense (default 32), or None.
    """

    kv_sparsity: float | None = None
    attn_sparsity: float | None = None
    kv_k_sparsity: float | None = None
    kv_v_sparsity: float | None = None
    kv_window: int | None = None

    def __post_init__(self) -> None:
        if self.kv_sparsity is not None:
            check_float("runtime.kv_sparsity", self.kv_sparsity, 0.0, 0.99)
        if self.attn_sparsity is not None:
            check_float("runtime.attn_sparsity", self.attn_sparsity, 0.0, 0.99)
        for name in ("kv_k_sparsity", "kv_v_sparsity"):
            if getattr(self, name) is not None:
                check_float(f"runtime.{name}", getattr(self, name), 0.0, 0.99)
        if self.kv_window is not None:
            check_int("runtime.kv_window", self.kv_window)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Recipe:
    """A full compression recipe: ordered prune stages + calibration + save + runtime."""

    stages: list[PruneConfig] = field(default_factory=list)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prune": [{"method": s.method, **s.to_dict()} for s in self.stages],
            "calibration": self.calibration.to_dict(),
            "save": self.save.to_dict(),
            "runtime": self.runtime.to_dict(),
        }
