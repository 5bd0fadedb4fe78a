"""Activation-sparsity thresholds (TEAL): per decoder layer and linear input group, saved as safetensors + JSON.

Groups: the linears that read the same input share one threshold (TEAL):

* ``qkv``: ``q_proj``, ``k_proj``, ``v_proj`` (the attention input),
* ``o``: ``o_proj`` (the attention output),
* ``gate_up``: ``gate_proj``, ``up_proj`` (the MLP input),
* ``down``: ``down_proj`` (the gated intermediate state).

An :class:`ActThresholds` holds, per layer and group, the threshold table ``quantiles [L, 4, Q + 1]`` (the
threshold at sparsity ``j / Q``, from :func:`llmprune.calibration.magnitudes.threshold_table`) and the
allocation path ``path [L, P, 4]``: the group sparsities at the block-level sparsities ``levels [P]`` (uniform:
every group at the level; greedy: TEAL's block-wise greedy path, :mod:`llmprune.runtime.actsparse.allocation`).
A model-level target ``s`` (any ``s <= levels[-1]``) resolves to group sparsities by linear interpolation along
the path (block sparsity is linear in the group sparsities, so each layer stays exactly at ``s``), and those to
thresholds by linear interpolation in the table. Block sparsity is weighted by the weights each group's input
columns select: ``sum_g s_g * params_g / sum_g params_g``, i.e. the fraction of weight bytes a decode step skips.

Files: ``act_thresholds.safetensors`` (``quantiles``, ``path``, ``levels``, ``params``) and
``act_thresholds.json`` (format, version, target, allocation, group names, calibration info, file name of the
tensors); :func:`load_thresholds` takes either file or their directory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.reading import read_json
from llmprune.formats.safetensors_io import load_safetensors
from llmprune.model.access import projection_parents

JSON_FILE = "act_thresholds.json"
TENSOR_FILE = "act_thresholds.safetensors"
FORMAT = "llmprune.act_thresholds"
VERSION = 1
#: Group name -> member linears (attribute of ``self_attn`` / ``mlp``), in the order of the tensors' group axis.
GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "qkv": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
    "o": (("self_attn", "o_proj"),),
    "gate_up": (("mlp", "gate_proj"), ("mlp", "up_proj")),
    "down": (("mlp", "down_proj"),),
}
GROUP_NAMES = tuple(GROUPS)
ALLOCATIONS = ("uniform", "greedy")


def group_modules(layer: nn.Module) -> dict[str, list[nn.Module]]:
    """``{group: [linear, ...]}`` of one decoder layer (Llama-style ``self_attn`` / ``mlp``; any linear type)."""
    parts = projection_parents(layer)
    return {g: [getattr(parts[p], name) for p, name in members] for g, members in GROUPS.items()}


def group_params(layer: nn.Module) -> list[int]:
    """Weights behind each group's input columns: ``[4]`` ints (``in * out`` summed over the group's linears)."""
    return [sum(m.in_features * m.out_features for m in mods) for mods in group_modules(layer).values()]


def interp_table(table: torch.Tensor, s: float) -> float:
    """The threshold at sparsity ``s`` from a ``[Q + 1]`` table at ``j / Q`` (linear; ``inf`` only at ``s = 1``)."""
    q = table.numel() - 1
    if s >= 1.0:
        return math.inf
    pos = max(0.0, s) * q
    j = min(int(math.floor(pos)), q - 1)
    lo, hi = float(table[j]), float(table[j + 1])
    if not math.isfinite(hi):
        return lo
    return lo + (pos - j) * (hi - lo)


@dataclass
class ActThresholds:
    """Calibrated activation thresholds of one model (see the module doc).

    Attributes:
        quantiles: ``[L, 4, Q + 1]`` fp32 thresholds at sparsities ``j / Q``.
        levels: ``[P]`` increasing block-level sparsities of the path, ``levels[0] == 0``.
        path: ``[L, P, 4]`` group sparsities at each level.
        params: ``[L, 4]`` weights per group (the block-sparsity weights).
        target: the model-level sparsity it was calibrated for (the default at run time).
        allocation: ``"uniform"`` or ``"greedy"``.
        info: free-form calibration record (model, calibration settings, block errors).
    """

    quantiles: torch.Tensor
    levels: torch.Tensor
    path: torch.Tensor
    params: torch.Tensor
    target: float
    allocation: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        q, lv, p, w = self.quantiles, self.levels, self.path, self.params
        if q.dim() != 3 or q.shape[1] != len(GROUP_NAMES) or q.shape[2] < 2:
            raise ConfigError(f"activation thresholds: quantiles must be [layers, 4, Q+1], got {tuple(q.shape)}")
        layers = q.shape[0]
        if lv.dim() != 1 or lv.numel() < 2 or float(lv[0]) != 0.0 or bool((lv[1:] <= lv[:-1]).any()):
            raise ConfigError("activation thresholds: levels must be increasing and start at 0")
        if p.shape != (layers, lv.numel(), len(GROUP_NAMES)) or w.shape != (layers, len(GROUP_NAMES)):
            raise ConfigError(f"activation thresholds: path {tuple(p.shape)} / params {tuple(w.shape)} do not "
                              f"match {layers} layers x {lv.numel()} levels x 4 groups")
        if bool((p < 0).any()) or bool((p > 1).any()) or bool(torch.isnan(q).any()) or bool((q < 0).any()):
            raise ConfigError("activation thresholds: sparsities must be in [0, 1] and thresholds >= 0")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"activation thresholds: allocation must be uniform or greedy, got {self.allocation!r}")
        if not 0.0 <= float(self.target) <= float(lv[-1]) + 1e-9:
            raise ConfigError(f"activation thresholds: target {self.target} outside the path (max {float(lv[-1])})")

    @property
    def layers(self) -> int:
        return self.quantiles.shape[0]

    @property
    def max_sparsity(self) -> float:
        return float(self.levels[-1])

    def group_sparsities(self, target: float | None = None) -> torch.Tensor:
        """``[L, 4]`` group sparsities at model-level sparsity ``target`` (default :attr:`target`).

        Raises:
            ConfigError: if ``target`` is outside ``[0, max_sparsity]``.
        """
        s = float(self.target if target is None else target)
        if not 0.0 <= s <= self.max_sparsity + 1e-9:
            raise ConfigError(f"--act-sparsity {s} is beyond what these thresholds were calibrated for "
                              f"({self.allocation}, up to {self.max_sparsity:g}); rerun llmprune calibrate-act "
                              f"with --act-sparsity {s}")
        lv = self.levels.double()
        j = int(torch.searchsorted(lv, torch.tensor(s, dtype=torch.float64), right=True)) - 1
        j = min(max(j, 0), lv.numel() - 2)
        frac = (s - float(lv[j])) / float(lv[j + 1] - lv[j])
        frac = min(max(frac, 0.0), 1.0)
        return (self.path[:, j].double() * (1 - frac) + self.path[:, j + 1].double() * frac).float()

    def thresholds(self, target: float | None = None) -> list[dict[str, float]]:
        """``[{group: threshold}]`` per layer at model-level sparsity ``target`` (default :attr:`target`)."""
        sp = self.group_sparsities(target)
        return [{g: interp_table(self.quantiles[i, gi], float(sp[i, gi])) for gi, g in enumerate(GROUP_NAMES)}
                for i in range(self.layers)]

    def block_sparsity(self, target: float | None = None) -> list[float]:
        """Per-layer weighted block sparsity at ``target`` (equals ``target`` up to rounding)."""
        sp = self.group_sparsities(target).double()
        w = self.params.double()
        return [float(x) for x in (sp * w).sum(1) / w.sum(1)]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "tensors": TENSOR_FILE, "target": float(self.target),
                "allocation": self.allocation, "groups": {g: [n for _, n in m] for g, m in GROUPS.items()},
                "layers": self.layers, "levels": [float(x) for x in self.levels], "info": self.info}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``act_thresholds.safetensors`` and ``act_thresholds.json`` into ``directory`` (atomically each).

        Returns:
            the JSON file's path.
        """
        from safetensors.torch import save_file

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"quantiles": self.quantiles.float().contiguous(), "levels": self.levels.float().contiguous(),
                   "path": self.path.float().contiguous(), "params": self.params.to(torch.int64).contiguous()}
        tmp = d / f".{TENSOR_FILE}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, d / TENSOR_FILE)
        tmp = d / f".{JSON_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, d / JSON_FILE)
        return d / JSON_FILE


def thresholds_path(ref: str | os.PathLike) -> Path:
    """The JSON file of ``ref``: the file itself, its tensors file's sibling, or ``ref/act_thresholds.json``."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p / JSON_FILE
    return p.with_name(JSON_FILE) if p.name == TENSOR_FILE else p


def load_thresholds(ref: str | os.PathLike) -> ActThresholds:
    """Read :class:`ActThresholds` from ``act_thresholds.json`` (or its directory, or the safetensors file).

    Raises:
        ConfigError: when the files are missing or not valid thresholds files.
    """
    path = thresholds_path(ref)
    if not path.is_file():
        raise ConfigError(f"activation thresholds {path} do not exist (make them with llmprune calibrate-act)")
    try:
        meta = read_json(path, what="activation thresholds", required=True)
    except LlmpruneError as exc:
        raise ConfigError(str(exc)) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{path}: not an activation thresholds file (format {meta.get('format')!r}, "
                          f"version {meta.get('version')!r}; expected {FORMAT!r} {VERSION})")
    name = meta.get("tensors")
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"{path}: bad 'tensors' entry {name!r}")
    try:
        t = load_safetensors(path.with_name(name))
    except LlmpruneError as exc:
        raise ConfigError(str(exc)) from None
    missing = [k for k in ("quantiles", "levels", "path", "params") if k not in t]
    if missing:
        raise ConfigError(f"{path.with_name(name)}: missing tensors {missing}")
    try:
        return ActThresholds(t["quantiles"].float(), t["levels"].float(), t["path"].float(), t["params"].long(),
                             float(meta.get("target", -1.0)), str(meta.get("allocation")), meta.get("info") or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
