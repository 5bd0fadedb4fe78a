"""Base config dataclasses: validation helpers, the method config base, calibration and save options."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from llmprune.errors import ConfigError
from llmprune.sparsity import SparsityPattern


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
        sequential: which inputs a decoder layer's statistics see: ``"module"``, each linear's from the layer
            with its earlier linears already pruned, in one forward pass per layer; ``"layer"``, every linear's
            from the dense layer, then a second pass of the pruned layer (the Wanda/SparseGPT reference
            protocol); ``"auto"``, ``module`` when its activations (every batch in flight at once) fit in
            memory and no block recovery runs, else ``layer`` (see :mod:`llmprune.engine.sequential`).
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
    sequential: str = "auto"

    #: ``sequential`` values.
    SEQUENTIAL: ClassVar[tuple[str, ...]] = ("auto", "module", "layer")

    def __post_init__(self) -> None:
        if self.sequential not in self.SEQUENTIAL:
            raise ConfigError(f"calibration.sequential must be one of {', '.join(self.SEQUENTIAL)}, "
                              f"got {self.sequential!r}")
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
