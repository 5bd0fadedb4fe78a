import json

import pytest
import torch
from helpers import C4_PARQUET, needs_shared, tiny_llama, tiny_text, tiny_tokenizer

from llmprune.calibration.data import load_calibration, token_windows
from llmprune.config import CalibConfig
from llmprune.errors import LlmpruneError


def test_txt_source_shape_and_determinism(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(tiny_text(3000))
    tok = tiny_tokenizer()
    a = load_calibration(CalibConfig(source=str(p), nsamples=5, seqlen=40, seed=1), tok)
    b = load_calibration(CalibConfig(source=str(p), nsamples=5, seqlen=40, seed=1), tok)
    c = load_calibration(CalibConfig(source=str(p), nsamples=5, seqlen=40, seed=2), tok)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_jsonl_source_and_missing_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"content": tiny_text(200, seed=i)}) for i in range(10)))
    tok = tiny_tokenizer()
    ids = load_calibration(CalibConfig(source=str(p), text_field="content", nsamples=3, seqlen=50), tok)
    assert ids.shape == (3, 50)
    with pytest.raises(LlmpruneError, match="no 'text' column"):
        load_calibration(CalibConfig(source=str(p), nsamples=3, seqlen=50), tok)


def test_windows_come_from_the_stream():
    tok = tiny_tokenizer()
    docs = ["w1 w2 w3 w4", "w5 w6 w7"]
    ids = token_windows(docs, tok, nsamples=20, seqlen=3, seed=0, source="t")
    stream = set()
    for d in docs:
        stream.update(tok(d, add_special_tokens=False)["input_ids"])
    stream.add(tok.eos_token_id)
    assert set(ids.flatten().tolist()) <= stream


def test_self_generated_fallback_offline():
    # HF_HUB_OFFLINE=1 (conftest): "auto" falls back to sampling from the model.
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = load_calibration(CalibConfig(source="auto", nsamples=3, seqlen=12, seed=0), tok, model)
    assert ids.shape == (3, 12)
    assert (ids[:, 0] == tok.bos_token_id).all()
    again = load_calibration(CalibConfig(source="self", nsamples=3, seqlen=12, seed=0), tok, model)
    assert torch.equal(ids, again)


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(LlmpruneError, match="needs the Hub"):
        load_calibration(CalibConfig(source="c4", nsamples=1, seqlen=8), tiny_tokenizer())


@needs_shared(C4_PARQUET)
def test_shipped_c4_parquet():
    ids = load_calibration(CalibConfig(source=str(C4_PARQUET), nsamples=4, seqlen=64), tiny_tokenizer())
    assert ids.shape == (4, 64)
