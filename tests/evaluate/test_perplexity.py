import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_VOCAB, tiny_llama

from llmprune.errors import LlmpruneError
from llmprune.evaluate.perplexity import perplexity, wikitext2_text


def test_matches_manual_computation():
    model = tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 3 * 20 + 7))
    res = perplexity(model, ids, seqlen=20, progress=False, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            x = ids[:, w * 20 : (w + 1) * 20]
            logits = model(x).logits
            nll += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += 19
    assert res.windows == 3 and res.tokens == count
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_max_windows_and_too_short():
    model = tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 100))
    assert perplexity(model, ids, seqlen=10, max_windows=4, progress=False).windows == 4
    with pytest.raises(LlmpruneError, match="fewer than one window"):
        perplexity(model, ids, seqlen=200, progress=False)


def test_wikitext_file_protocol(tmp_path):
    p = tmp_path / "wiki.test.raw.txt"
    p.write_text(" = Title = \n\nfirst line\nsecond line\n")
    assert wikitext2_text(p) == " = Title = \n\nfirst line\n\nsecond line"
    assert wikitext2_text(tmp_path) == wikitext2_text(p)  # a directory works too
    with pytest.raises(LlmpruneError, match="not found"):
        wikitext2_text(tmp_path / "missing.txt")
