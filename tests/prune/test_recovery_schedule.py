"""CFSP LoRA recovery runs torch's cosine schedule: step t trains at cosine_lr(lr, t, steps)."""

import pytest
import torch
from helpers import TINY_VOCAB, tiny_llama

from llmprune.model.access import decoder_layers
from llmprune.prune.recovery import cosine_lr, recover


def test_recovery_steps_follow_the_cosine_schedule(monkeypatch):
    seen = []
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    model = tiny_llama()
    ids = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    recover(model, ids, [2] * len(decoder_layers(model)), steps=5, lr=0.01, batch_size=2, device="cpu")
    assert seen == pytest.approx([cosine_lr(0.01, t, 5) for t in range(5)], rel=1e-9, abs=1e-15)
