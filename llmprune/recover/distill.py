"""End-to-end recovery: distil the whole pruned model from the dense one with the mask held fixed.

Loss: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` on the logits (Hinton et al., 2015,
https://arxiv.org/abs/1503.02531), plus ``hidden_weight`` times the mean squared error of the hidden states
after every decoder layer. Only the pruned linears' weights train (fp32 master copies, Adam, cosine decay); their
gradients are masked and the weights re-masked after every step, so the zeros stay zero. The student runs with
gradient checkpointing when the model supports it. For models whose student and teacher fit the device.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmprune.config import RecoveryConfig
from llmprune.model.access import decoder_layers, linear_modules
from llmprune.model.device import module_device
from llmprune.prune.recovery import cosine_lr

log = logging.getLogger(__name__)


def sparse_linears(model: nn.Module) -> list[nn.Linear]:
    """The decoder layers' linears holding exact zeros (the pruned ones)."""
    return [m for layer in decoder_layers(model) for m in linear_modules(layer).values()
            if bool((m.weight == 0).any())]


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: RecoveryConfig) -> torch.Tensor:
    """The distillation loss of one batch ``ids`` ``[b, s]`` (a 0-d tensor with the student's graph)."""
    want_hidden = cfg.hidden_weight > 0
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=want_hidden, use_cache=False)
    s_out = student(ids, output_hidden_states=want_hidden, use_cache=False)
    temp = cfg.temperature
    t_logp = F.log_softmax(t_out.logits.float() / temp, dim=-1)
    s_logp = F.log_softmax(s_out.logits.float() / temp, dim=-1)
    loss = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean") * temp**2
    if want_hidden:
        pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
        loss = loss + cfg.hidden_weight * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
    return loss


@torch.no_grad()
def mean_loss(student: nn.Module, teacher: nn.Module, calib: torch.Tensor, cfg: RecoveryConfig,
              device: torch.device) -> float:
    """:func:`distill_loss` averaged over the calibration sequences (``cfg.batch_size`` at a time)."""
    total, n = 0.0, 0
    for lo in range(0, calib.shape[0], cfg.batch_size):
        ids = calib[lo:lo + cfg.batch_size].to(device)
        total += float(distill_loss(student, teacher, ids, cfg)) * ids.shape[0]
        n += ids.shape[0]
    return total / max(n, 1)


def distill(student: nn.Module, teacher: nn.Module, calib: torch.Tensor, cfg: RecoveryConfig, *,
            device: torch.device, batch_size: int | None = None, progress: bool = False) -> dict:
    """Distil ``student`` (pruned, modified in place) from ``teacher`` (dense) on calibration ``calib`` ``[n, s]``.

    Args:
        batch_size: unused (``cfg.batch_size`` sequences per step); kept for the caller's symmetry.

    Returns:
        ``{"loss_before", "loss_after", "steps", "sequences", "seconds"}`` (losses over all ``calib``).
    """
    t0 = time.perf_counter()
    homes = module_device(student), module_device(teacher)
    student.to(device)
    teacher.to(device).eval()
    linears = sparse_linears(student)
    saved = [(p, p.requires_grad) for p in student.parameters()]
    checkpointing = bool(getattr(student, "supports_gradient_checkpointing", False))
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        for lin in linears:
            lin.weight.requires_grad_(True)
        before = mean_loss(student, teacher, calib, cfg, device)
        if checkpointing:
            if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x names
                student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            student.train()  # checkpointing is active in training mode only; the models have no dropout in use
        masks = [lin.weight.detach() != 0 for lin in linears]
        masters = [lin.weight.detach().float().clone() for lin in linears]
        opt = torch.optim.Adam(masters, lr=cfg.peak_lr)
        n = calib.shape[0]
        bar = tqdm(range(cfg.steps), desc="distill", unit="step", disable=not progress)
        for t in bar:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.peak_lr, t, cfg.steps)
            lo = (t * cfg.batch_size) % n
            ids = calib[lo:lo + cfg.batch_size].to(device)
            with torch.enable_grad():
                loss = distill_loss(student, teacher, ids, cfg)
                loss.backward()
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
            for lin, w, keep in zip(linears, masters, masks):
                w.grad = lin.weight.grad.float() * keep
                lin.weight.grad = None
            opt.step()
            with torch.no_grad():
                for lin, w, keep in zip(linears, masters, masks):
                    w.mul_(keep)
                    lin.weight.data.copy_(w)
        if checkpointing:
            (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
        student.eval()
        after = mean_loss(student, teacher, calib, cfg, device)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
        student.to(homes[0])
        teacher.to(homes[1])
    log.info("distillation: loss %.4f -> %.4f in %d steps", before, after, cfg.steps)
    return {"loss_before": before, "loss_after": after, "steps": cfg.steps, "sequences": int(calib.shape[0]),
            "seconds": round(time.perf_counter() - t0, 2)}
