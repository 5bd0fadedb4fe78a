"""Gated block-sparse attention at inference: the ``llmprune_gated`` attention implementation.

:func:`attach_gates` hangs one :class:`~llmprune.runtime.gates.gate.AttnGate` on each attention module (outside the
module tree, so ``state_dict``/``save_pretrained`` are unchanged), adds a pre-hook that stashes the layer's
RoPE ``cos``/``sin``, and switches the model to ``llmprune_gated`` (registered with transformers'
``AttentionInterface``; masks are built exactly as for ``sdpa``). Per call the attention function:

* keeps the gate's **incremental state**: pooled-and-projected gate keys of every *completed* KV block, plus
  the pre-RoPE keys / queries of the current partial block, so a decode step only pools new tokens;
* scores the current query block (at decode: the running mean of its queries so far, the causal analogue of
  the prefill average) against all KV blocks, and selects blocks per KV head (:func:`~llmprune.runtime.gates.gate.select_blocks`);
* **decode** (one query token, no padding mask) where :func:`~llmprune.runtime.kernel_policy.use_kernel`
  allows it (CUDA by default): the Triton kernel :func:`llmprune.kernels.gated_attention.gated_attention` visits
  only the selected blocks;
* **prefill, and everything else (CPU)**: dense SDPA with the block mask expanded to tokens (same result as a
  block-sparse kernel, no speed-up: prefill is compute bound and a block-sparse prefill kernel is future work).

With ``attn_sparsity`` 0 (or None) and no threshold/budget the call is plain ``sdpa`` (identical logits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmprune.errors import LlmpruneError
from llmprune.formats.gates_meta import GATES_CONFIG
from llmprune.model.access import decoder_layers
from llmprune.runtime.gates.budgets import budgets_at
from llmprune.runtime.gates.files import load_gates
from llmprune.runtime.gates.gate import AttnGate, pool_k, pool_q, select_blocks, unrotate
from llmprune.runtime.kernel_policy import GATED_DECODE_QUERIES, backend_from_flag, use_kernel

log = logging.getLogger(__name__)
IMPL = "llmprune_gated"


@dataclass
class GateRuntime:
    """Selection policy, plus recall / sparsity counters.

    ``sparsity`` / ``threshold`` / ``budget`` apply to every layer; ``layer_sparsity`` (one block sparsity per
    decoder layer, e.g. from :func:`~llmprune.runtime.gates.budgets.layer_sparsities`) overrides ``sparsity``
    layer by layer. ``backend`` requests the decode kernel: ``"auto"`` / ``"triton"`` / ``"torch"``
    (:mod:`llmprune.runtime.kernel_policy`); ``use_kernel`` is its older boolean spelling.
    """

    sparsity: float | None = None
    layer_sparsity: list[float] | None = None
    threshold: float | None = None
    budget: int | None = None
    measure_recall: bool = False
    backend: str = "auto"
    recall_sum: float = 0.0
    recall_rows: int = 0
    kept_blocks: int = 0
    causal_blocks: int = 0

    @property
    def use_kernel(self) -> bool | None:
        """``backend`` as a flag: None for auto, True for triton, False for torch."""
        return {"auto": None, "triton": True, "torch": False}[self.backend]

    @use_kernel.setter
    def use_kernel(self, flag: bool | None) -> None:
        self.backend = backend_from_flag(flag)

    @property
    def active(self) -> bool:
        return (self.threshold is not None or self.budget is not None or bool(self.sparsity)
                or bool(self.layer_sparsity and any(self.layer_sparsity)))

    def reset_stats(self) -> None:
        self.recall_sum, self.recall_rows, self.kept_blocks, self.causal_blocks = 0.0, 0, 0, 0

    @property
    def recall(self) -> float | None:
        """Mean over query rows and heads of the true attention mass inside the kept blocks."""
        return self.recall_sum / self.recall_rows if self.recall_rows else None

    def summary(self) -> str:
        if not self.active:
            return "attention gates attached, inactive (attn_sparsity 0): dense attention"
        rec, sp = self.recall, self.achieved_sparsity
        policy = ("per-layer attn_sparsity (mean "
                  f"{sum(self.layer_sparsity) / len(self.layer_sparsity):.3f})" if self.layer_sparsity else
                  f"attn_sparsity {self.sparsity}" if self.sparsity else
                  f"threshold {self.threshold}" if self.threshold is not None else f"budget {self.budget} tokens")
        return (f"attention gates: {policy}; blocks skipped {sp:.1%} of causal block pairs; "
                f"gate recall {rec:.4f} (true attention mass inside kept blocks)" if rec is not None else
                f"attention gates: {policy} (no attention calls measured)")

    @property
    def achieved_sparsity(self) -> float | None:
        """Fraction of causal (query block, KV block) pairs skipped, over all layers and heads."""
        return 1.0 - self.kept_blocks / self.causal_blocks if self.causal_blocks else None


@dataclass
class _State:
    batch: int
    length: int
    kdone: torch.Tensor  # [b, Hkv, n_done, gate_dim] projected gate keys of completed blocks
    ktail: torch.Tensor  # [b, Hkv, r, d] pre-RoPE keys of the partial block
    qtail: torch.Tensor  # [b, Hq, r, d] pre-RoPE queries of the current query block


def attention_module(layer):
    for name in ("self_attn", "attn", "self_attention"):
        mod = getattr(layer, name, None)
        if mod is not None:
            return mod
    raise LlmpruneError(f"cannot find the attention module of {type(layer).__name__}")


def _stash_rope(module, args, kwargs):
    module._llmprune_pe = kwargs.get("position_embeddings")


def install_rope_stash(attn):
    return attn.register_forward_pre_hook(_stash_rope, with_kwargs=True)


def attach_gates(model, gates, *, attn_sparsity=None, threshold=None, budget=None) -> GateRuntime:
    """Attach gates (a directory saved by ``train-gates`` or a list of :class:`AttnGate`) to ``model``.

    Selection: ``attn_sparsity`` (fraction of KV blocks skipped), ``threshold`` or ``budget`` (tokens);
    with none given, the sparsity recorded in the gates' JSON is used (dense if absent), with its per-layer
    budgets (``layer_sparsity``, ``train-gates --allocation entropy``) when it has them; they also apply when
    the ``attn_sparsity`` asked for is their mean. Returns the
    :class:`GateRuntime`, also reachable as ``gate_runtime(model)``; change its fields at any time.
    """
    meta = {}
    source = "these attention gates"
    if isinstance(gates, (str, Path)):
        source = str(Path(gates) / GATES_CONFIG)
        gates, meta = load_gates(gates)
    if not gates:
        raise LlmpruneError(f"{source}: no gates to attach")
    layers = decoder_layers(model)
    cfg = gates[0].cfg
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    want = {"num_layers": len(layers), "num_heads": heads,
            "num_kv_heads": getattr(c, "num_key_value_heads", None) or heads, "head_dim": head_dim}
    have = {"num_layers": len(gates), "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim}
    for key, value in want.items():
        if have[key] != value:
            raise LlmpruneError(f"{source}: gate_config.{key} is {have[key]} but the model has {value}: these "
                                "attention gates were trained for a model of a different shape")
    detach_gates(model)
    if attn_sparsity is None and threshold is None and budget is None:
        attn_sparsity = meta.get("attn_sparsity")
    rt = GateRuntime(sparsity=attn_sparsity, threshold=threshold, budget=budget)
    if threshold is None and budget is None:
        rt.layer_sparsity = budgets_at(meta.get("layer_sparsity"), attn_sparsity)
    param = next(model.parameters())
    handles = []
    for layer, gate in zip(layers, gates):
        attn = attention_module(layer)
        gate.to(param.device).eval().requires_grad_(False)
        gate.runtime, gate.state = rt, None
        object.__setattr__(attn, "_llmprune_gate", gate)  # not a submodule: state_dict stays the model's own
        handles.append(install_rope_stash(attn))
    object.__setattr__(model, "_llmprune_gates", (rt, handles, model.config._attn_implementation))
    model.set_attn_implementation(IMPL)
    return rt


def detach_gates(model) -> None:
    """Remove gates attached by :func:`attach_gates` and restore the previous attention implementation."""
    info = getattr(model, "_llmprune_gates", None)
    if info is None:
        return
    _, handles, impl = info
    for h in handles:
        h.remove()
    for layer in decoder_layers(model):
        attn = attention_module(layer)
        for name in ("_llmprune_gate", "_llmprune_pe"):
            if name in attn.__dict__:
                object.__delattr__(attn, name)
    object.__delattr__(model, "_llmprune_gates")
    model.set_attn_implementation(impl or "sdpa")


def gate_runtime(model) -> GateRuntime | None:
    info = getattr(model, "_llmprune_gates", None)
    return info[0] if info else None


def _select(module, gate: AttnGate, q: torch.Tensor, k: torch.Tensor):
    """Update the gate state with the new tokens; ``(keep [b,Hkv,nq,nk], first query block)`` or None (dense)."""
    cfg, rt = gate.cfg, gate.runtime
    bs = cfg.block_size
    b, _, sq, _ = q.shape
    length = k.shape[2]
    start = length - sq
    if gate.q_proj.device != q.device:
        gate.to(q.device)
    cos, sin = getattr(module, "_llmprune_pe", None) or (None, None)
    q_pre, k_new = unrotate(q, cos, sin), unrotate(k[:, :, start:], cos, sin)
    st = gate.state
    if start == 0 or st is None or st.length != start or st.batch != b:
        if start != 0:
            log.warning("gate state out of sync with the KV cache (layer %s): dense attention", module.layer_idx)
            gate.state = None
            return None
        empty = q.new_zeros(b, cfg.num_kv_heads, 0, cfg.gate_dim, dtype=torch.float32)
        st = _State(b, 0, empty, k_new[:, :, :0], q_pre[:, :, :0])
    ktail = torch.cat((st.ktail, k_new), 2)
    n_done, full = st.kdone.shape[2], ktail.shape[2] // bs
    if full:
        pos = torch.arange(n_done, n_done + full, device=q.device)
        st.kdone = torch.cat((st.kdone, gate.project_k(pool_k(ktail[:, :, : full * bs], bs), pos)), 2)
        ktail = ktail[:, :, full * bs :]
    q0 = start // bs
    qcat = torch.cat((st.qtail, q_pre), 2)
    st.ktail, st.qtail, st.length = ktail, qcat[:, :, (length // bs - q0) * bs :], length
    gate.state = st
    if not rt.active and not rt.measure_recall:
        return None
    gk = st.kdone
    if ktail.shape[2]:
        tail_pos = torch.tensor([gk.shape[2]], device=q.device)
        gk = torch.cat((gk, gate.project_k(pool_k(ktail, bs), tail_pos)), 2)
    qpos = torch.arange(q0, q0 + -(-qcat.shape[2] // bs), device=q.device)
    kpos = torch.arange(gk.shape[2], device=q.device)
    logp = gate.scores(gate.project_q(pool_q(qcat, bs, cfg.num_kv_heads), qpos), gk, qpos, kpos)
    if rt.active:
        sparsity = rt.sparsity if rt.layer_sparsity is None else rt.layer_sparsity[module.layer_idx]
        keep = select_blocks(logp, qpos, sparsity=sparsity, threshold=rt.threshold, budget=rt.budget, block_size=bs)
    else:
        keep = kpos[None, :] <= qpos[:, None]
    rt.kept_blocks += int(keep.sum())
    rt.causal_blocks += int((qpos + 1).sum()) * b * cfg.num_kv_heads
    return keep, q0


def _token_mask(keep, q0, sq, length, bs, attention_mask):
    rows = torch.arange(length - sq, length, device=keep.device)
    cols = torch.arange(length, device=keep.device)
    m = keep[:, :, rows // bs - q0][..., cols // bs] & (cols[None, :] <= rows[:, None])
    if attention_mask is not None:
        am = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        m = m & am[..., -sq:, :length]
    return m  # [b, Hkv, sq, L]


def _recall(qg, k, m, causal, scaling, chunk=1024):
    total = 0.0
    for r0 in range(0, qg.shape[2], chunk):
        s = torch.matmul(qg[:, :, r0 : r0 + chunk].float(), k.float().transpose(-1, -2)) * scaling
        p = s.masked_fill(~causal[:, :, r0 : r0 + chunk], float("-inf")).softmax(-1)
        total += float((p * m[:, :, r0 : r0 + chunk]).sum())
    return total


def gated_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function registered as ``llmprune_gated`` (same signature as transformers' ``sdpa``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = getattr(module, "_llmprune_capture", None)
    if capture is not None:
        capture(module, query, key, scaling)
    gate = getattr(module, "_llmprune_gate", None)
    sel = _select(module, gate, query, key) if gate is not None and not module.training else None
    if sel is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    keep, q0 = sel
    rt, bs = gate.runtime, gate.cfg.block_size
    b, hq, sq, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    g = hq // hkv
    scaling = scaling if scaling is not None else d**-0.5
    no_pad = attention_mask is None or bool(attention_mask.all())
    if (sq == GATED_DECODE_QUERIES and no_pad and not rt.measure_recall
            and use_kernel(query.device, requested=rt.backend)):
        # Imported on first use: triton's @jit picks compiled vs interpreted when the kernel module loads.
        from llmprune.kernels.gated_attention import gated_attention

        out = gated_attention(query[:, :, 0], key, value, keep[:, :, 0], bs, scaling)
        return out.unsqueeze(1), None
    m = _token_mask(keep, q0, sq, length, bs, attention_mask)
    mg = m[:, :, None].expand(b, hkv, g, sq, length).reshape(b, hkv, g * sq, length)
    qg = query.reshape(b, hkv, g * sq, d)
    if rt.measure_recall:
        causal = _token_mask(torch.ones_like(keep), q0, sq, length, bs, attention_mask)
        causal = causal[:, :, None].expand(b, hkv, g, sq, length).reshape(b, hkv, g * sq, length)
        rt.recall_sum += _recall(qg, key, mg, causal, scaling)
        rt.recall_rows += b * hq * sq
    out = F.scaled_dot_product_attention(qg, key, value, attn_mask=mg, scale=scaling)
    return out.view(b, hq, sq, d).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL, gated_attention_forward)
    AttentionMaskInterface.register(IMPL, sdpa_mask)

