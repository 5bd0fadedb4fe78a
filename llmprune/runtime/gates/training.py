"""Training attention gates by self-distillation, with the base model frozen.

Layer by layer (:func:`~llmprune.engine.layerwise.capture_layer_inputs` / ``run_layer``, one decoder
layer on the device at a time): each layer runs once over the calibration batches with a capture hook in
the ``llmprune_gated`` attention function that records, per batch, the gate's inputs (pre-RoPE Q pooled
per block, pre-RoPE K pooled max/min/avg) and the ground-truth block distribution
(:func:`~llmprune.runtime.gates.gate.block_ground_truth`, chunked over queries). The gate's inputs and targets depend
only on the frozen model, so the gate then trains for ``steps`` AdamW steps on these small pooled tensors
alone: no backward pass through the model, no activation memory, no gradient checkpointing needed. The
layer's dense outputs feed the next layer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from llmprune.calibration.capture import capture_layer_inputs, run_layer
from llmprune.model.access import decoder_layers
from llmprune.model.device import on_device
from llmprune.runtime.gates.gate import (
    AttnGate,
    GateConfig,
    block_ground_truth,
    kl_loss,
    pool_k,
    pool_q,
    unrotate,
)
from llmprune.runtime.gates.runtime import IMPL, attention_module, install_rope_stash

log = logging.getLogger(__name__)


@dataclass
class GateTrainReport:
    """Per layer: KL(gt || gate) before and after training; total wall time."""

    kl_init: list[float] = field(default_factory=list)
    kl_final: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_kl(self) -> float:
        return sum(self.kl_final) / len(self.kl_final) if self.kl_final else float("nan")

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'KL init':>8}  {'KL final':>8}"]
        lines += [f"{i:>5}  {a:>8.4f}  {b:>8.4f}" for i, (a, b) in enumerate(zip(self.kl_init, self.kl_final))]
        mean_init = sum(self.kl_init) / max(len(self.kl_init), 1)
        lines.append(f"{'mean':>5}  {mean_init:>8.4f}  {self.mean_kl:>8.4f}")
        return "\n".join(lines)


def _capture(cfg: GateConfig, sink: list):
    def capture(module, query, key, scaling):
        cos, sin = getattr(module, "_llmprune_pe", None) or (None, None)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        gt = block_ground_truth(query, key, scale, cfg.block_size)
        qf = pool_q(unrotate(query, cos, sin), cfg.block_size, cfg.num_kv_heads)
        kf = pool_k(unrotate(key, cos, sin), cfg.block_size)
        sink.append((qf, kf, gt))

    return capture


def fit_gate(gate: AttnGate, feats: list, steps: int, lr: float, batch: int = 16, seed: int = 0) -> tuple[float, float]:
    """Train one gate on ``[(qf, kf, gt), ...]``; returns (KL before, KL after) over all samples."""
    qf, kf, gt = (torch.cat(t) for t in zip(*feats))
    threads = torch.get_num_threads()
    if gt.device.type == "cpu":  # tiny ops: extra threads only spin (40x slower on a loaded 2-core machine)
        torch.set_num_threads(1)
    try:
        return _fit(gate, qf, kf, gt, steps, lr, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(gate, qf, kf, gt, steps, lr, batch, seed) -> tuple[float, float]:
    gate.train().requires_grad_(True)

    @torch.no_grad()
    def full_kl() -> float:
        return float(sum(kl_loss(gt[i : i + batch], gate(qf[i : i + batch], kf[i : i + batch])) * len(gt[i : i + batch])
                         for i in range(0, len(gt), batch)) / len(gt))

    before = full_kl()
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(gt), generator=gen)[:batch].to(gt.device)
        loss = kl_loss(gt[idx], gate(qf[idx], kf[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    gate.eval().requires_grad_(False)
    return before, full_kl()


def train_gates(
    model,
    calib: torch.Tensor,
    cfg: GateConfig | None = None,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
    seed: int = 0,
) -> tuple[list[AttnGate], GateTrainReport]:
    """Train one gate per attention layer of ``model`` (frozen) on ``calib [nsamples, seqlen]`` token ids.

    Args:
        model: a Hugging Face causal LM using transformers' attention interface (Llama, Mistral, Qwen2, ...).
        calib: calibration token ids; no padding (ground truth assumes plain causal attention).
        cfg: gate shape (default: :meth:`GateConfig.for_model` with block 64, gate dim 64).
        steps: AdamW steps per layer (minibatches of 16 sequences of pooled features).
        lr: peak learning rate (cosine decay).
        device: where each layer runs and its gate trains.
        batch_size: calibration sequences per forward pass.

    Returns:
        ``(gates, report)``.
    """
    cfg = cfg or GateConfig.for_model(model)
    device = torch.device(device)
    torch.manual_seed(seed)
    report = GateTrainReport()
    t0 = time.perf_counter()
    prev = model.config._attn_implementation
    model.set_attn_implementation(IMPL)
    model.requires_grad_(False)
    gates: list[AttnGate] = []
    try:
        inputs = capture_layer_inputs(model, calib, device, batch_size)
        layers = decoder_layers(model)
        bar = tqdm(range(len(layers)), desc="train gates", unit="layer", disable=not progress)
        for idx in bar:
            layer = layers[idx]
            attn = attention_module(layer)
            feats: list = []
            handle = install_rope_stash(attn)
            attn._llmprune_capture = _capture(cfg, feats)
            try:
                with on_device([layer], device), torch.no_grad():
                    for b in range(len(inputs)):
                        out = run_layer(layer, inputs, b)
                        if idx + 1 < len(layers):
                            inputs.hidden[b] = out
            finally:
                handle.remove()
                del attn._llmprune_capture
                attn.__dict__.pop("_llmprune_pe", None)
            gate = AttnGate(cfg).to(device)
            before, after = fit_gate(gate, feats, steps, lr, seed=seed + idx)
            gates.append(gate.cpu())
            report.kl_init.append(before)
            report.kl_final.append(after)
            bar.set_postfix(kl=f"{after:.4f}")
            log.info("layer %d: KL %.4f -> %.4f", idx, before, after)
    finally:
        model.set_attn_implementation(prev or "sdpa")
    report.seconds = time.perf_counter() - t0
    return gates, report
