"""``llmprune env``: the versions and the hardware a bug report needs, in one block to paste."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata
from typing import Any

from llmprune._version import __version__
from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream

NAME = "env"
HELP = "versions (python, torch, transformers, triton ...), CUDA/GPU and platform, for bug reports"

#: distributions whose versions matter to llmprune (read from their metadata: none of them is imported)
PACKAGES = ("torch", "transformers", "triton", "accelerate", "safetensors", "huggingface_hub", "tokenizers",
            "datasets", "lm_eval", "peft", "numpy", "pyyaml")
#: environment variables that change what llmprune does (values shown; none of them holds a secret)
VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_ENDPOINT", "CUDA_VISIBLE_DEVICES",
             "LLMPRUNE_KERNELS", "LLMPRUNE_LM_EVAL_DATA", "TRITON_INTERPRET", "OMP_NUM_THREADS")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_json_argument(p, "the report")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _accelerator() -> dict[str, Any]:
    """CUDA as torch sees it (torch is imported here only: it is the one way to ask)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is exactly what a report should show
        return {"error": f"{type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cpu_threads": torch.get_num_threads()}
    if info["cuda_available"]:
        info["gpus"] = [
            {"name": torch.cuda.get_device_name(i), "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())
        ]
    return info


def collect() -> dict[str, Any]:
    """The report: llmprune, python, platform, package versions, CUDA/GPUs and the relevant variables."""
    return {
        "llmprune": __version__,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
        "accelerator": _accelerator(),
        "environment": {name: os.environ[name] for name in VARIABLES if name in os.environ},
    }


def format_report(report: dict[str, Any]) -> str:
    """``key: value`` lines (Markdown-friendly) for pasting into an issue."""
    lines = [f"- {key}: {report[key]}" for key in ("llmprune", "python", "platform", "machine", "cpus")]
    lines += [f"- {name}: {version or 'not installed'}" for name, version in report["packages"].items()]
    acc = report["accelerator"]
    if "error" in acc:
        lines.append(f"- torch import failed: {acc['error']}")
    else:
        lines.append(f"- CUDA available: {acc['cuda_available']} (torch built for CUDA {acc['torch_cuda']}), "
                     f"torch CPU threads: {acc['cpu_threads']}")
        lines += [f"- GPU {i}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
                  for i, g in enumerate(acc.get("gpus", []))]
    lines += [f"- ${name}={value}" for name, value in report["environment"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    target = json_target(args)
    report = collect()
    print(format_report(report), file=text_stream(args))
    emit_json(target, report)
    return 0
