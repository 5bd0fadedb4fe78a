"""Short LoRA recovery fine-tune after structured pruning, merged back into the weights.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) adapters on every linear of the
chosen decoder layers; CFSP (https://arxiv.org/abs/2409.13199) gives more rank to the
layers with larger coarse importance (:func:`lora_ranks`). Adapters are merged and removed
afterwards, so the result has the same modules and state-dict keys as before.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmprune.config import check_float, check_int
from llmprune.model.access import decoder_layers
from llmprune.model.device import module_device

log = logging.getLogger(__name__)


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


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B A x`` with a frozen ``base``; ``B`` starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x.float(), self.lora_a), self.lora_b) * self.scale
        return self.base(x) + delta.to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w = self.base.weight
        w.add_((self.lora_b @ self.lora_a * self.scale).to(w.dtype))
        return self.base


def _wrap(layer: nn.Module, rank: int) -> list[LoRALinear]:
    wrapped = []
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank)
                setattr(parent, name, lora)
                wrapped.append(lora)
    return wrapped


def _unwrap(layer: nn.Module) -> None:
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


def recover(
    model: nn.Module,
    calib: torch.Tensor,
    ranks: list[int],
    steps: int,
    lr: float,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
) -> None:
    """Short LoRA fine-tune of the pruned model on the calibration sequences, merged afterwards.

    The whole model runs on ``device`` for these steps (causal-LM loss on the calibration ids).

    Args:
        calib: ``[n, seqlen]`` token ids.
        ranks: LoRA rank per decoder layer (0 leaves the layer untouched), e.g. :func:`lora_ranks`.
        steps, lr, batch_size: AdamW steps with a cosine schedule from ``lr``, sequences per step.
    """
    layers = decoder_layers(model)
    home = module_device(model)
    params_state = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params_state:
        p.requires_grad_(False)
    model.to(device)
    loras = []
    for layer, r in zip(layers, ranks):
        if r > 0:
            loras.extend(_wrap(layer, r))
    trainable = [p for m in loras for p in (m.lora_a, m.lora_b)]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    # cosine decay from lr towards 0 over the run (step t uses cosine_lr(lr, t, steps)), torch's own schedule
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=0.0)
    g = torch.Generator().manual_seed(0)
    was_training = model.training
    model.train()
    try:
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
    finally:
        for layer in layers:
            _unwrap(layer)
        model.train(was_training)
        for p, req in params_state:
            p.requires_grad_(req)
        model.to(home)
