"""What the runtime calibrators (``calibrate-kv``, ``calibrate-act``) share: the output and model set-up, and
recording their result in a checkpoint's ``llmprune.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.calibration.data import check_calib_source, clip_seqlen, load_calibration
from llmprune.config import CalibConfig, RuntimeConfig
from llmprune.errors import ConfigError
from llmprune.formats.checkpoint import read_metadata
from llmprune.formats.output import METADATA_FILE
from llmprune.model.device import resolve_device
from llmprune.model.loading import DEFAULT_MODEL, load_pretrained, load_tokenizer, parse_dtype, resolve_model


@dataclass
class CalibrationRun:
    """A calibrator's inputs: where it writes, the device, the loaded model and its calibration ids ``[n, seqlen]``."""

    out_dir: Path
    device: torch.device
    model: nn.Module
    ids: torch.Tensor
    calibration: CalibConfig


def prepare_calibration_run(model_ref: str | os.PathLike | None, output: str | os.PathLike | None, what: str,
                            calibration: CalibConfig | None, device: str | torch.device | None,
                            dtype: str | torch.dtype, trust_remote_code: bool, progress: bool) -> CalibrationRun:
    """Check the output (default: ``model_ref`` when it is a checkpoint), load the model and the calibration ids.

    Args:
        what: what the calibrator writes, for the error when ``output`` is missing (e.g. ``"the budgets"``).
        calibration: default 32 x 512 tokens.

    Raises:
        ConfigError: no output for a non-checkpoint model, an output that is not a directory, a bad source.
    """
    local = Path(model_ref).expanduser() if model_ref is not None else None
    is_ckpt = local is not None and local.is_dir() and (local / METADATA_FILE).is_file()
    if output is None:
        if not is_ckpt:
            raise ConfigError(f"{model_ref or DEFAULT_MODEL} is not a checkpoint directory: pass -o DIR for {what}")
        output = local
    out_dir = Path(output).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"-o {output}: not a directory")
    cal = calibration or CalibConfig(nsamples=32, seqlen=512)
    check_calib_source(cal)
    dev = resolve_device(device)
    parse_dtype(dtype)
    resolved = resolve_model(model_ref)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    model = load_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
    cal = clip_seqlen(cal, model.config)
    ids = load_calibration(cal, tokenizer, model, progress=progress)
    return CalibrationRun(out_dir, dev, model, ids, cal)


def record_in_checkpoint(out_dir: Path, replaced: tuple[str, ...], runtime_update: dict[str, Any], key: str,
                         info: dict[str, Any]) -> Path | None:
    """Record a calibrator's result in ``out_dir/llmprune.json`` when there is one (atomically); else None.

    The recipe's runtime fields named in ``replaced`` are dropped, ``runtime_update`` is set (and checked as loading
    will read it back) and ``info`` is stored under ``key``. Returns the metadata path written.
    """
    target = out_dir / METADATA_FILE
    if not target.is_file():
        return None
    meta = read_metadata(out_dir) or {}
    recipe = meta.setdefault("recipe", {})
    runtime = {n: val for n, val in (recipe.get("runtime") or {}).items() if n not in replaced}
    runtime.update(runtime_update)
    RuntimeConfig.from_dict(runtime)  # what loading will read back
    recipe["runtime"] = runtime
    meta[key] = info
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, target)
    return target
