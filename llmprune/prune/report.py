"""What pruning did: one :class:`ModuleReport` per linear, gathered in a :class:`PruneReport`; what a compress
run produced: :class:`CompressResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModuleReport:
    """What happened to one linear (``recovery``: its block recovery part's losses, see :mod:`llmprune.recover`)."""

    name: str
    layer: int
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    method: str
    recovery: dict | None = None


@dataclass
class PruneReport:
    """Outcome of :func:`llmprune.prune`: one entry per pruned module, and wall time."""

    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    distill: dict | None = None  # end-to-end recovery (llmprune.recover.distill): losses before/after, steps
    sequential: str | None = None  # the calibration order the per-linear stages ran in ("module" / "layer")

    def recovery(self) -> list[dict]:
        """Block recovery per decoder layer: ``[{"layer": i, part: {"loss_before", "loss_after", "steps"}}]``
        (deterministic, so a resumed run records the same; the time is in the modules' ``seconds``)."""
        rows: dict[int, dict] = {}
        for m in self.modules:
            if m.recovery:
                rows.setdefault(m.layer, {"layer": m.layer})[m.recovery["part"]] = {
                    k: v for k, v in m.recovery.items() if k not in ("part", "seconds")}
        return [rows[k] for k in sorted(rows)]

    @property
    def overall_sparsity(self) -> float:
        total = sum(m.shape[0] * m.shape[1] for m in self.modules)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules)
        return zeros / total if total else 0.0

    def per_layer(self) -> list[tuple[int, int, float, float]]:
        """``(layer, n_modules, sparsity, seconds)`` per decoder layer."""
        rows: dict[int, list[ModuleReport]] = {}
        for m in self.modules:
            rows.setdefault(m.layer, []).append(m)
        out = []
        for layer, mods in sorted(rows.items()):
            numel = sum(m.shape[0] * m.shape[1] for m in mods)
            zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in mods)
            out.append((layer, len(mods), zeros / numel if numel else 0.0, sum(m.seconds for m in mods)))
        return out

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'modules':>7}  {'sparsity':>8}  {'time (s)':>8}"]
        for layer, n, sp, secs in self.per_layer():
            lines.append(f"{layer:>5}  {n:>7}  {sp:>8.2%}  {secs:>8.2f}")
        lines.append(f"{'all':>5}  {len(self.modules):>7}  {self.overall_sparsity:>8.2%}  {self.seconds:>8.2f}")
        return "\n".join(lines)


@dataclass
class CompressResult:
    """Outcome of :func:`llmprune.compress`.

    Attributes:
        output: the checkpoint directory written.
        report: what pruning did.
        metadata: the checkpoint's ``llmprune.json`` content.
    """

    output: Path
    report: PruneReport
    metadata: dict
