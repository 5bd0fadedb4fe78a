"""A full compression recipe (:class:`Recipe`): prune stages, calibration, save, runtime and recovery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmprune.config.base import CalibConfig, PruneConfig, SaveConfig
from llmprune.config.recovery import RecoveryConfig
from llmprune.config.runtime import RuntimeConfig
from llmprune.errors import ConfigError


def check_sequential(sequential: str, recover: RecoveryConfig | None) -> None:
    """The calibration order ``sequential`` works with the recovery stage ``recover``.

    Raises:
        ConfigError: ``module`` with block recovery, which reconstructs each layer against the dense layer's
            outputs (the one-pass order never computes them).
    """
    if sequential == "module" and recover is not None and recover.block is not None:
        raise ConfigError("calibration.sequential 'module' cannot be combined with block recovery, which "
                          "reconstructs each layer against the dense layer's outputs (use 'layer' or 'auto')")


@dataclass
class Recipe:
    """A full compression recipe: ordered prune stages + calibration + save + runtime (+ recovery)."""

    stages: list[PruneConfig] = field(default_factory=list)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recover: RecoveryConfig | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks across sections (the sections check themselves); call again after changing sections.

        Raises:
            ConfigError: one line naming the conflict.
        """
        check_sequential(self.calibration.sequential, self.recover)

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
