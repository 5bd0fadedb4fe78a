"""The runtime flags (``--kv-sparsity``, ``--gates`` ...), derived from the :class:`~llmprune.config.RuntimeConfig`
fields, and the dtype a runtime command runs in: light on purpose (the standard library and :mod:`llmprune.config`
only, no torch), so ``llmprune ppl --help`` and friends answer at once. The flags are re-exported by
:mod:`llmprune.runtime.options`, which applies the options.
"""

from __future__ import annotations

import argparse
import dataclasses

from llmprune.config import RuntimeConfig


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`~llmprune.config.RuntimeConfig` field (``dest`` = the field name)."""
    group = parser.add_argument_group(
        "runtime options",
        "default: the runtime section recorded in a checkpoint's llmprune.json; a KV-cache flag replaces the "
        "recorded KV-cache settings, an attention-gate flag the recorded gate settings",
    )
    fields = {f.name: f for f in dataclasses.fields(RuntimeConfig)}
    for name in (n for group in RuntimeConfig.GROUPS for n in group):  # grouped in --help
        md = fields[name].metadata
        group.add_argument(md["flag"], dest=name, type=md["type"], default=None, metavar=md["metavar"], help=md["help"])


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The runtime flags of ``args`` (see :func:`add_runtime_arguments`) as a validated ``RuntimeConfig``."""
    return RuntimeConfig(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(RuntimeConfig)})


def runtime_dtype(dtype: object, device: object) -> object:
    """The dtype ``ppl`` / ``eval`` / ``generate`` load a model in: ``"auto"`` on the CPU is ``"float32"``.

    CPUs run fp32 matmuls faster than bf16/fp16 ones (as ``compress``, which computes in fp32 on the CPU, see
    :func:`llmprune.engine.layerwise.default_compute_dtype`), and an fp32 checkpoint is unchanged by it; any
    other ``dtype`` (``--dtype bfloat16`` to run a 16-bit checkpoint as stored), or another device, is kept.

    Args:
        dtype: the ``--dtype`` value (``"auto"``, a dtype name, or a ``torch.dtype``).
        device: a ``torch.device`` (anything with ``.type``).
    """
    return "float32" if dtype in (None, "auto") and getattr(device, "type", None) == "cpu" else dtype
