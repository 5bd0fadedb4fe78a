"""The files of a model's attention gates: ``attn_gates.safetensors`` (weights) and ``attn_gates.json`` (config).

:func:`save_gates` writes them (fp32 weights, the :class:`~llmprune.runtime.gates.gate.GateConfig` plus any
extra metadata); :func:`load_gates` reads them back without trusting them: the recorded config is validated
like the CLI flags (:func:`gate_config_from_meta`) and the weights must be exactly the tensors that config
describes, floating point and finite (:func:`check_gate_tensors`); every problem is one
:class:`~llmprune.errors.LlmpruneError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from llmprune.errors import LlmpruneError
from llmprune.formats.gates_meta import GATES_CONFIG, GATES_FILE, read_gates_meta
from llmprune.formats.safetensors_io import load_safetensors
from llmprune.runtime.gates.gate import AttnGate, GateConfig


def save_gates(gates: list[AttnGate], directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``attn_gates.safetensors`` (fp32) and ``attn_gates.json`` (config + ``extra``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.{n}": p.detach().float().cpu().contiguous() for i, g in enumerate(gates)
               for n, p in g.named_parameters()}
    save_file(tensors, str(directory / GATES_FILE))
    meta = {"gate_config": dataclasses.asdict(gates[0].cfg), **(extra or {})}
    (directory / GATES_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


_REQUIRED = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


def _int_field(where, key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LlmpruneError(f"{where}: gate_config.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def gate_config_from_meta(meta, where: str | Path) -> GateConfig:
    """The :class:`GateConfig` recorded in ``attn_gates.json`` (``meta``), validated like the CLI flags.

    Checked: ``gate_config`` is an object with the known keys, the sizes are positive integers (``head_dim`` and
    ``gate_dim`` even, for RoPE), ``block_size`` a power of two >= 16, ``num_heads`` a multiple of
    ``num_kv_heads``, ``rope_base`` a finite positive number; a recorded ``attn_sparsity`` lies in [0, 1).

    Raises:
        LlmpruneError: naming the file (``where``) and the key.
    """
    if not isinstance(meta, dict):
        raise LlmpruneError(f"{where}: expected a JSON object with a 'gate_config' object")
    raw = meta.get("gate_config")
    if not isinstance(raw, dict):
        raise LlmpruneError(f"{where}: gate_config: missing or not an object (written by llmprune train-gates)")
    names = [f.name for f in dataclasses.fields(GateConfig)]
    for key in raw:
        if key not in names:
            raise LlmpruneError(f"{where}: gate_config.{key}: unknown key (expected: {', '.join(names)})")
    for key in _REQUIRED:
        if key not in raw:
            raise LlmpruneError(f"{where}: gate_config.{key}: missing")
    cfg = dict(raw)
    for key in ("num_layers", "num_heads", "num_kv_heads", "distance_buckets"):
        if key in cfg:
            _int_field(where, key, cfg[key], 1)
    for key in ("head_dim", "gate_dim"):
        if key in cfg and (_int_field(where, key, cfg[key], 2) % 2):
            raise LlmpruneError(f"{where}: gate_config.{key} must be even, got {cfg[key]}")
    if "block_size" in cfg:
        bs = _int_field(where, "block_size", cfg["block_size"], 16)
        if bs & (bs - 1):
            raise LlmpruneError(f"{where}: gate_config.block_size must be a power of two >= 16, got {bs}")
    if "rope_base" in cfg:
        rb = cfg["rope_base"]
        if isinstance(rb, bool) or not isinstance(rb, (int, float)) or not math.isfinite(rb) or rb <= 0:
            raise LlmpruneError(f"{where}: gate_config.rope_base must be a positive number, got {rb!r}")
    if cfg["num_heads"] % cfg["num_kv_heads"]:
        raise LlmpruneError(f"{where}: gate_config.num_heads ({cfg['num_heads']}) is not a multiple of "
                            f"gate_config.num_kv_heads ({cfg['num_kv_heads']})")
    sp = meta.get("attn_sparsity")
    if sp is not None and (isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0.0 <= sp < 1.0):
        raise LlmpruneError(f"{where}: attn_sparsity must be a number in [0, 1), got {sp!r}")
    ls = meta.get("layer_sparsity")
    if ls is not None and (not isinstance(ls, list) or len(ls) != cfg["num_layers"] or not all(
            not isinstance(x, bool) and isinstance(x, (int, float)) and 0.0 <= x < 1.0 for x in ls)):
        raise LlmpruneError(f"{where}: layer_sparsity must be a list of {cfg['num_layers']} numbers in [0, 1), "
                            f"got {ls!r}")
    return GateConfig(**cfg)


def gate_tensor_shapes(cfg: GateConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``attn_gates.safetensors`` holds for ``cfg`` (``layers.<i>.<param>``)."""
    h, g, d, dg = cfg.num_kv_heads, cfg.group, cfg.head_dim, cfg.gate_dim
    per_layer = {"q_proj": (h, g * d, dg), "k_proj": (h, 3 * d, dg), "dist_bias": (h, cfg.distance_buckets)}
    return {f"layers.{i}.{n}": shape for i in range(cfg.num_layers) for n, shape in per_layer.items()}


def check_gate_tensors(state: dict, cfg: GateConfig, where: str | Path) -> None:
    """The gate weights match ``cfg``: exactly the expected names and shapes, floating point, finite values.

    Raises:
        LlmpruneError: naming the file (``where``) and the first offending tensor.
    """
    expected = gate_tensor_shapes(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LlmpruneError(f"{where}: tensor {missing[0]!r} is missing{more}; {GATES_CONFIG} describes "
                            f"{cfg.num_layers} layers")
    extra = sorted(k for k in state if k not in expected)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise LlmpruneError(f"{where}: unexpected tensor {extra[0]!r}{more} (not in the gates {GATES_CONFIG} describes)")
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise LlmpruneError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} "
                                f"(from {GATES_CONFIG} gate_config)")
        if not t.is_floating_point():
            raise LlmpruneError(f"{where}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}, "
                                "expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise LlmpruneError(f"{where}: tensor {key!r} holds NaN or infinite values")


def load_gates(directory: str | Path) -> tuple[list[AttnGate], dict]:
    """Gates saved by :func:`save_gates` -> ``(gates, metadata)``."""
    meta = read_gates_meta(directory)
    if meta is None:
        raise LlmpruneError(f"no attention gates ({GATES_FILE} + {GATES_CONFIG}) in {directory}")
    cfg = gate_config_from_meta(meta, Path(directory) / GATES_CONFIG)
    state = load_safetensors(Path(directory) / GATES_FILE)  # checked: a corrupt file is one LlmpruneError
    check_gate_tensors(state, cfg, Path(directory) / GATES_FILE)
    gates = []
    for i in range(cfg.num_layers):
        gate = AttnGate(cfg)
        gate.load_state_dict({n: state[f"layers.{i}.{n}"] for n, _ in gate.named_parameters()})
        gates.append(gate.eval().requires_grad_(False))
    return gates, meta
