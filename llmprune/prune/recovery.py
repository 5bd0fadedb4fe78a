"""Short LoRA recovery fine-tune after structured pruning, merged back into the weights.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) adapters, from ``peft``, on every linear of the
chosen decoder layers; CFSP (https://arxiv.org/abs/2409.13199) gives more rank to the layers with larger
coarse importance (:func:`lora_ranks`, passed to peft as ``rank_pattern``). Adapters are merged and removed
afterwards (``merge_and_unload``), so the result has the same modules and state-dict keys as before.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.config import check_float, check_int
from llmprune.model.access import decoder_layers, decoder_layers_path, linear_modules
from llmprune.model.device import module_device

if TYPE_CHECKING:  # peft imports ~all of transformers' training stack: only a run with recovery pays for it
    from peft import LoraConfig, PeftModel

log = logging.getLogger(__name__)

ADAPTER = "default"


@dataclass
class RecoveryOptions:
    """Recovery fields of a config that shrinks a model (a dataclass mixin; call :meth:`check_recovery`).

    Attributes:
        recover_steps: LoRA recovery steps after pruning (0 = off).
        recover_lr: peak learning rate (cosine decay to 0).
        lora_rank: mean LoRA rank (per layer it follows the coarse importance, :func:`lora_ranks`).
        recover_batch_size: calibration sequences per step.
    """

    recover_steps: int = 0
    recover_lr: float = 2e-4
    lora_rank: int = 8
    recover_batch_size: int = 2

    def check_recovery(self) -> None:
        check_int("recover_steps", self.recover_steps, minimum=0)
        check_float("recover_lr", self.recover_lr, 1e-8, 1.0)
        check_int("lora_rank", self.lora_rank)
        check_int("recover_batch_size", self.recover_batch_size)


def lora_ranks(importance: list[float], rank: int) -> list[int]:
    """Per-layer LoRA rank proportional to coarse importance, mean ``rank``, at least 1."""
    imp = torch.tensor(importance, dtype=torch.float64).clamp_min(1e-6)
    return [max(1, int(round(float(r)))) for r in rank * imp / imp.mean()]


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """Learning rate of ``step`` (0-based) of ``steps``: cosine decay from ``lr`` towards 0."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def lora_targets(model: nn.Module, ranks: list[int]) -> dict[str, int]:
    """``{full module name: rank}`` for every linear of each decoder layer whose rank is > 0."""
    prefix = decoder_layers_path(model)
    return {f"{prefix}.{i}.{name}": r
            for i, (layer, r) in enumerate(zip(decoder_layers(model), ranks)) if r > 0
            for name in linear_modules(layer)}


def lora_config(targets: dict[str, int]) -> LoraConfig:
    """peft ``LoraConfig`` for :func:`lora_targets`: rank ``r`` and alpha ``2 r`` (scale 2) per module.

    ``rank_pattern``/``alpha_pattern`` keys are regexes matched at the end of a module name, hence escaped full
    names (``layers.1.`` must not match ``layers.11.``). No dropout, peft's default init (A Kaiming-uniform,
    B zero, so the model is unchanged at step 0).
    """
    from peft import LoraConfig

    rank_pattern = {re.escape(name): r for name, r in targets.items()}
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=list(targets),
                      rank_pattern=rank_pattern, alpha_pattern={k: 2 * r for k, r in rank_pattern.items()})


def add_lora(model: nn.Module, ranks: list[int], seed: int = 0) -> PeftModel | None:
    """Inject LoRA adapters in place (peft ``get_peft_model``); ``None`` when every rank is 0.

    The adapters are initialised from ``seed`` on the CPU generator, without touching the global RNG state, so
    the same seed gives the same adapters whatever ran before. Adapters are kept in fp32 (peft's autocast of
    bf16/fp16 adapter weights), so a bf16 model trains fp32 low-rank updates. ``model`` itself keeps working
    (its linears are replaced by peft's ``lora.Linear``); only the adapter weights are trainable.
    """
    from peft import get_peft_model

    targets = lora_targets(model, ranks)
    if not targets:
        return None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers' deprecated `is_gradient_checkpointing` (FutureWarning in transformers 5)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(targets), adapter_name=ADAPTER, autocast_adapter_dtype=True)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA ``A`` and ``B`` weights peft injected into ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    return [p for m in model.modules() if isinstance(m, LoraLayer)
            for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]


def train_lora(model: nn.Module, calib: torch.Tensor, trainable: list[nn.Parameter], steps: int, lr: float,
               batch_size: int, device: torch.device | str, progress: bool = False) -> None:
    """AdamW on ``trainable`` with torch's cosine schedule from ``lr`` to 0; causal-LM loss on ``calib`` rows.

    Args:
        calib: ``[n, seqlen]`` token ids; each step draws ``batch_size`` rows (generator seeded 0).
    """
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    # cosine decay from lr towards 0 over the run (step t uses cosine_lr(lr, t, steps)), torch's own schedule
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="recovery", unit="step", disable=not progress):
            idx = torch.randint(0, calib.shape[0], (batch_size,), generator=g)
            ids = calib[idx].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            schedule.step()
            if step == 0 or step + 1 == steps:
                log.info("recovery step %d/%d loss %.4f", step + 1, steps, loss.item())


def recover(
    model: nn.Module,
    calib: torch.Tensor,
    ranks: list[int],
    steps: int,
    lr: float,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
    seed: int = 0,
) -> None:
    """Short LoRA fine-tune of the pruned model on the calibration sequences, merged afterwards.

    The whole model runs on ``device`` for these steps (causal-LM loss on the calibration ids); afterwards it
    is back on its own device with its own modules, each adapted linear holding ``W + 2 B A`` (``B`` ``[out, r]``,
    ``A`` ``[r, in]``), and the ``requires_grad`` flags it had.

    Args:
        calib: ``[n, seqlen]`` token ids.
        ranks: LoRA rank per decoder layer (0 leaves the layer untouched), e.g. :func:`lora_ranks`.
        steps, lr, batch_size: AdamW steps with a cosine schedule from ``lr``, sequences per step.
        seed: adapter initialisation (:func:`add_lora`).
    """
    home = module_device(model)
    params_state = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.to(device)
    peft_model = None
    try:
        peft_model = add_lora(model, ranks, seed)
        if peft_model is None:
            log.info("recovery: every LoRA rank is 0, nothing to train")
            return
        trainable = adapter_parameters(model)
        for p in model.parameters():  # peft freezes the base already; the exact set trained is explicit here
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        model.train()
        train_lora(model, calib, trainable, steps, lr, batch_size, device, progress)
    finally:
        if peft_model is not None:
            peft_model.merge_and_unload()  # in place: model's linears become plain nn.Linear again, W += s B A
        model.train(was_training)
        for p, req in params_state:
            p.requires_grad_(req)
        model.to(home)
