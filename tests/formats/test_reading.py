"""The reading layer (formats/reading.py, formats/safetensors_io.py): JSON, safetensors headers, torch pickles,
index paths, 2:4 validation.

Unit tests on real corrupted files; the CLI-level behaviour (one ``llmprune: error:`` line, exit 2) is in
tests/model/test_verified_loading.py.
"""

import json
import math
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from llmprune.errors import LlmpruneError
from llmprune.evaluate.results import read_results
from llmprune.formats.checkpoint import read_metadata
from llmprune.formats.gates_meta import gates_base_model, read_gates_meta
from llmprune.formats.reading import index_weight_map, inside, load_torch, read_json
from llmprune.formats.safetensors_io import (
    checkpoint_tensors,
    is_finite,
    load_safetensors,
    open_safetensors,
    read_safetensors_header,
)
from llmprune.formats.sparse24 import pack_24, validate_packed
from llmprune.sparsity import nm_mask


@pytest.fixture
def st_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)},
              str(p), metadata={"format": "pt"})
    return p


# ------------------------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"{not json", "is not valid JSON"),
        (b"", "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object, not a list"),
        (b'"text"', "not a string"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a UTF-8 text file"),
        (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    ],
    ids=["garbled", "empty", "list", "string", "binary", "deep"],
)
def test_read_json_refuses(tmp_path, content, needle):
    p = tmp_path / "x.json"
    p.write_bytes(content)
    with pytest.raises(LlmpruneError, match=needle) as exc:
        read_json(p)
    assert str(p) in str(exc.value) and "\n" not in str(exc.value)


def test_read_json_missing_and_types(tmp_path):
    assert read_json(tmp_path / "none.json") is None
    with pytest.raises(LlmpruneError, match="file not found"):
        read_json(tmp_path / "none.json", required=True)
    (tmp_path / "l.json").write_text("[1]")
    assert read_json(tmp_path / "l.json", expect=list) == [1]
    (tmp_path / "d.json").mkdir()
    with pytest.raises(LlmpruneError, match="not a file"):
        read_json(tmp_path / "d.json")


@pytest.mark.parametrize("content", [b"{oops", b"[]", b"\xff\xfe\x00binary", b'{"format": 5}'])
def test_read_metadata_refuses_bad_llmprune_json(tmp_path, content):
    (tmp_path / "llmprune.json").write_bytes(content)
    with pytest.raises(LlmpruneError, match="llmprune.json"):
        read_metadata(tmp_path)


def test_read_results_and_gates_meta(tmp_path):
    assert read_results(tmp_path) == {}
    (tmp_path / "eval_results.json").write_text("[]")
    with pytest.raises(LlmpruneError, match="eval_results.json must hold a JSON object"):
        read_results(tmp_path)
    (tmp_path / "attn_gates.safetensors").write_bytes(b"")
    (tmp_path / "attn_gates.json").write_text('"x"')
    with pytest.raises(LlmpruneError, match="attn_gates.json must hold a JSON object"):
        read_gates_meta(tmp_path)
    (tmp_path / "attn_gates.json").write_text('{"base_model": 7}')
    with pytest.raises(LlmpruneError, match="'base_model' must be a model name"):
        gates_base_model(tmp_path)


# ----------------------------------------------------------------------------------------- safetensors


def test_valid_file_reads(st_file):
    header = read_safetensors_header(st_file)
    assert header["a"].dtype == "F32" and header["a"].shape == (3, 4) and header["b"].dtype == "I64"
    with open_safetensors(st_file) as f:
        assert sorted(f.keys()) == ["a", "b"] and f.get("a")[2, 3].item() == 11
    assert set(load_safetensors(st_file)) == {"a", "b"}


def _corrupt(path, how):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if how == "truncated":
        path.write_bytes(raw[:-7])
    elif how == "random":
        path.write_bytes(os.urandom(len(raw)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "short":
        path.write_bytes(b"\x01\x02")
    elif how == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    elif how == "header_past_end":
        path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    elif how == "garbled_header":
        path.write_bytes(raw[:8] + b"!" * n + raw[8 + n:])
    elif how == "trailing":
        path.write_bytes(raw + b"\x00" * 16)
    else:  # rewrite one header field, keeping the header length
        entry = header["a"]
        if how == "bad_dtype":
            entry["dtype"] = "Q99"
        elif how == "bad_shape":
            entry["shape"] = [3, -4]
        elif how == "shape_vs_offsets":
            entry["shape"] = [3, 5]
        elif how == "overlap":
            entry["data_offsets"] = [0, 48]  # onto "b"
        elif how == "metadata":
            header["__metadata__"] = {"format": 1}
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        path.write_bytes(struct.pack("<Q", n) + text.ljust(n) + raw[8 + n:])


CORRUPTIONS = ["truncated", "random", "empty", "short", "huge_header", "header_past_end", "garbled_header",
               "trailing", "bad_dtype", "bad_shape", "shape_vs_offsets", "overlap", "metadata"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_safetensors_is_one_error(st_file, how):
    _corrupt(st_file, how)
    for reader in (read_safetensors_header, open_safetensors, load_safetensors):
        with pytest.raises(LlmpruneError) as exc:
            reader(st_file)
        msg = str(exc.value)
        assert str(st_file) in msg and "\n" not in msg, msg


def test_huge_header_is_not_read(st_file, monkeypatch):
    _corrupt(st_file, "huge_header")
    with pytest.raises(LlmpruneError, match="header length 1152921504606846976"):
        read_safetensors_header(st_file)


# ------------------------------------------------------------------------------------------------ torch


def test_load_torch(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(2)}, good)
    assert torch.equal(load_torch(good)["x"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(LlmpruneError, match="refused: not a pickle of plain tensors") as exc:
        load_torch(evil)
    assert str(evil) in str(exc.value) and "\n" not in str(exc.value)
    for content in (b"", b"garbage" * 10, good.read_bytes()[:50]):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content)
        with pytest.raises(LlmpruneError, match="bad.pt"):
            load_torch(bad)
    with pytest.raises(LlmpruneError, match="file not found"):
        load_torch(tmp_path / "none.pt")


# ------------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../x", "", "..\\x", "sub/../../y"])
def test_inside_refuses_escapes(tmp_path, name):
    with pytest.raises(LlmpruneError, match="outside the checkpoint|invalid"):
        inside(tmp_path, name)


def test_inside_symlinks(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (tmp_path / "d" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(LlmpruneError, match="resolves outside"):
        inside(tmp_path / "d", "link.safetensors")
    (tmp_path / "d" / "real.safetensors").write_bytes(b"x")
    (tmp_path / "d" / "ok.safetensors").symlink_to("real.safetensors")
    assert inside(tmp_path / "d", "ok.safetensors") == tmp_path / "d" / "ok.safetensors"
    assert inside(tmp_path / "d", "sub/x.safetensors") == tmp_path / "d" / "sub" / "x.safetensors"
    # a Hugging Face cache snapshot links into its repo's blobs/: allowed
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"x")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(os.path.relpath(repo / "blobs" / "abc", snap))
    assert inside(snap, "model.safetensors") == snap / "model.safetensors"


@pytest.mark.parametrize(
    "index,needle",
    [
        ({"weight_map": {"a": "../evil.safetensors"}}, "outside the checkpoint"),
        ({"weight_map": {"a": 3}}, "not a file name"),
        ({"weight_map": []}, "no 'weight_map'"),
        ({}, "no 'weight_map'"),
        ([], "must hold a JSON object"),
    ],
)
def test_index_weight_map_refuses(tmp_path, index, needle):
    p = tmp_path / "model.safetensors.index.json"
    p.write_text(json.dumps(index))
    with pytest.raises(LlmpruneError, match=needle):
        index_weight_map(p)


def test_checkpoint_tensors_index_consistency(tmp_path, st_file):
    d = st_file.parent
    st_file.rename(d / "s1.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    assert set(checkpoint_tensors(d)) == {"a", "b"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": "s1.safetensors"}}))
    with pytest.raises(LlmpruneError, match="places tensor 'c' in s1.safetensors, which does not hold it"):
        checkpoint_tensors(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s2.safetensors"}}))
    with pytest.raises(LlmpruneError, match="shard s2.safetensors listed in the index is missing"):
        checkpoint_tensors(d)
    assert checkpoint_tensors(tmp_path / "nothing-here") is None


def test_is_finite_chunks():
    t = torch.zeros(1000)
    assert is_finite(t, chunk=7) and is_finite(torch.ones(3, dtype=torch.int64))
    t[999] = float("inf")
    assert not is_finite(t, chunk=7)
    t[999] = float("nan")
    assert not is_finite(t.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------- 2:4 layout


def _packed(rows=6, cols=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return pack_24(w * nm_mask(w.abs(), 2, 4))


def test_validate_packed_accepts_pack_24():
    for cols in (4, 32, 36, 72, 200):
        v, m = _packed(cols=cols)
        validate_packed(v, m, cols)
        validate_packed(v, m, cols, rows_per_chunk=1)


def test_validate_packed_refuses():
    v, m = _packed()  # 72 columns: 36 values, 3 words, 12 unused 2-bit slots in the last one
    dup = m.clone()
    dup[2, 0] = 0  # every group of word 0 of row 2: positions 0, 0
    with pytest.raises(ValueError, match=r"row 2, group 0 \(columns 0..3\): positions 0, 0 are not strictly increasing"):
        validate_packed(v, dup, 72)
    dec = m.clone()
    dec[4, 1] = (dec[4, 1] & ~0xF) | (3 | (1 << 2))  # group 8 of row 4: positions 3, 1
    with pytest.raises(ValueError, match=r"row 4, group 8 .*positions 3, 1"):
        validate_packed(v, dec, 72)
    high = m.clone()
    high[1, 2] |= 1 << 30
    with pytest.raises(ValueError, match="row 1: unused high bits"):
        validate_packed(v, high, 72)
    with pytest.raises(ValueError, match=r"meta must be int32 \[6, 3\], got torch.int64"):
        validate_packed(v, m.long(), 72)
    with pytest.raises(ValueError, match=r"meta must be int32 \[6, 3\], got torch.int32 \(6, 2\)"):
        validate_packed(v, m[:, :2], 72)
    with pytest.raises(ValueError, match="values must be a floating"):
        validate_packed(v.to(torch.int32), m, 72)
    with pytest.raises(ValueError, match="values must be a floating"):
        validate_packed(v[:, :30], m, 72)
    with pytest.raises(ValueError, match="multiple of 4"):
        validate_packed(v, m, 70)


def test_validate_packed_is_fast_enough():
    import time

    v, m = _packed(rows=4096, cols=4096)
    t0 = time.perf_counter()
    validate_packed(v, m, 4096)
    assert time.perf_counter() - t0 < 2.0
    assert math.ceil(4096 / 32) == m.shape[1]
