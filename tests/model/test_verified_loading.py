"""Loading verifies instead of trusting: every bad file gives exactly one ``llmprune: error:`` line and exit 2.

Real corrupted files, through the CLI (``compress`` in memory and streaming, ``ppl``, ``convert``) and the API;
each case also checks that nothing was written to the output, and valid variants (tied embeddings, shards,
``.bin``, per-layer sizes, packed) still load: no false positives.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_VOCAB, run_cli, tiny_llama, tiny_text, tiny_tokenizer
from safetensors.torch import load_file, save_file

import llmprune
from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import save_checkpoint

UP = "model.layers.0.mlp.up_proj.weight"


def expect_error(capsys, *argv, names=(), output=None) -> str:
    """Run the CLI; assert exit 2 with exactly one ``llmprune: error:`` line naming ``names``; nothing at ``output``."""
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    for name in names:
        assert str(name) in lines[0], lines[0]
    if output is not None:
        out = Path(output)
        assert not out.exists(), f"{out} was written"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp output left"
    return lines[0]


def compress_args(model_dir, out, streaming=False):
    args = ["compress", model_dir, "--method", "magnitude", "--sparsity", "2:4", "--device", "cpu", "-o", out, "-q"]
    return args + (["--low-memory"] if streaming else ["--no-low-memory"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny Llama + tokenizer (copied per test)."""
    d = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def model_dir(base, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(base, d)
    return d


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    p = tmp_path_factory.mktemp("wiki") / "wiki.txt"
    p.write_text("\n".join(tiny_text(300, seed=i) for i in range(3)))
    return p


def ppl_args(model, wiki):
    return ["ppl", model, "--data-path", wiki, "--seqlen", 32, "--max-windows", 1, "--device", "cpu", "-q"]


def rewrite(path, change):
    """Rewrite safetensors file ``path`` with ``change(tensors)`` applied (a real, valid safetensors file)."""
    tensors = dict(load_file(str(path)))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------- class 1: corrupt safetensors files


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    elif how == "garbled_header":
        n = struct.unpack("<Q", raw[:8])[0]
        path.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
    elif how == "trailing":
        path.write_bytes(raw + b"junk")


DAMAGE = ["truncated", "random", "empty", "huge_header", "garbled_header", "trailing"]


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("how", DAMAGE)
def test_corrupt_safetensors_compress(model_dir, tmp_path, capsys, how, streaming):
    _damage(model_dir / "model.safetensors", how)
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(model_dir, out, streaming), names=["model.safetensors"], output=out)


@pytest.mark.parametrize("how", ["truncated", "huge_header"])
def test_corrupt_safetensors_ppl(model_dir, wiki, capsys, how):
    _damage(model_dir / "model.safetensors", how)
    expect_error(capsys, *ppl_args(model_dir, wiki), names=["model.safetensors"])


# --------------------------------------------------------------- class 2: tensors that do not match the model


def _missing(t):
    del t[UP]


def _int64(t):
    t[UP] = (t[UP] * 100).to(torch.int64)


def _nan(t):
    t[UP] = torch.full_like(t[UP], float("nan"))


def _inf(t):
    t[UP] = t[UP].clone()
    t[UP][3, 5] = float("inf")


def _shape(t):
    t[UP] = torch.zeros(64, 64)


def _extra(t):
    t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)


TENSOR_CASES = {
    "missing": (_missing, [UP, "lacks"]),
    "int64": (_int64, [UP, "I64"]),
    "nan": (_nan, [UP, "NaN"]),
    "inf": (_inf, [UP, "NaN or infinite"]),
    "shape": (_shape, [UP, "(64, 64)"]),
    "unexpected": (_extra, ["model.layers.0.mlp.extra_proj.weight"]),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensors_compress(model_dir, tmp_path, capsys, case, streaming):
    change, names = TENSOR_CASES[case]
    rewrite(model_dir / "model.safetensors", change)
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(model_dir, out, streaming), names=names, output=out)


@pytest.mark.parametrize("case", ["missing", "nan", "int64"])
def test_bad_tensors_ppl_and_api(model_dir, wiki, capsys, case):
    change, names = TENSOR_CASES[case]
    rewrite(model_dir / "model.safetensors", change)
    expect_error(capsys, *ppl_args(model_dir, wiki), names=names)
    with pytest.raises(LlmpruneError, match=UP.replace(".", r"\.")):
        llmprune.load(model_dir)


def test_nan_in_a_later_layer_streaming(model_dir, tmp_path, capsys):
    key = "model.layers.1.self_attn.o_proj.weight"
    rewrite(model_dir / "model.safetensors", lambda t: t.__setitem__(key, torch.full_like(t[key], float("nan"))))
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(model_dir, out, streaming=True), names=[key], output=out)


# --------------------------------------------------------------------------- class 3: sharded-checkpoint index


@pytest.fixture
def sharded_dir(tmp_path):
    d = tmp_path / "sharded"
    tiny_llama().save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _edit_index(d: Path, change) -> dict:
    p = d / "model.safetensors.index.json"
    data = json.loads(p.read_text())
    change(data["weight_map"], d)
    p.write_text(json.dumps(data))
    return data


def _first_shard(wm):
    return sorted(set(wm.values()))[0]


def _dotdot(wm, d):
    (d.parent / "evil.safetensors").write_bytes((d / _first_shard(wm)).read_bytes())
    wm[UP] = "../evil.safetensors"


def _absolute(wm, d):
    wm[UP] = str(d.parent / "evil.safetensors")


def _symlink(wm, d):
    (d.parent / "outside.safetensors").write_bytes((d / _first_shard(wm)).read_bytes())
    (d / "link.safetensors").symlink_to(d.parent / "outside.safetensors")
    wm[UP] = "link.safetensors"


def _missing_shard(wm, d):
    wm[UP] = "model-09-of-09.safetensors"


def _wrong_shard(wm, d):
    shards = sorted(set(wm.values()))
    wm[UP] = next(s for s in shards if s != wm[UP])


INDEX_CASES = {
    "dotdot": (_dotdot, ["../evil.safetensors", "outside"]),
    "absolute": (_absolute, ["evil.safetensors", "outside"]),
    "symlink": (_symlink, ["link.safetensors", "resolves outside"]),
    "missing_shard": (_missing_shard, ["model-09-of-09.safetensors"]),
    "wrong_shard": (_wrong_shard, [UP]),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index_compress(sharded_dir, tmp_path, capsys, case, streaming):
    change, names = INDEX_CASES[case]
    _edit_index(sharded_dir, change)
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(sharded_dir, out, streaming), names=names, output=out)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"weight_map": 5}'])
def test_index_not_an_index(sharded_dir, tmp_path, capsys, content):
    (sharded_dir / "model.safetensors.index.json").write_text(content)
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(sharded_dir, out), names=["model.safetensors.index.json"], output=out)


# ------------------------------------------------------------------- class 4: per-layer sizes (llmprune_llama)


@pytest.fixture
def structured_dir(tmp_path):
    """A non-uniform llmprune_llama checkpoint: layer 0 keeps 96 FFN channels and 1 KV head."""
    from llmprune.model.structured import resize_layers, sync_config

    model = tiny_llama()
    resize_layers(model, [96, 128], [1, 2])
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    sync_config(model)
    d = tmp_path / "structured"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["model_type"] == "llmprune_llama"
    return d


STRUCTURED_CASES = {
    "negative": ("llmprune_intermediate_sizes", [-96, 128], "llmprune_intermediate_sizes[0]"),
    "zero": ("llmprune_kv_heads", [0, 2], "llmprune_kv_heads[0]"),
    "too_few": ("llmprune_intermediate_sizes", [96], "1 entries for 2 layers"),
    "not_a_list": ("llmprune_kv_heads", 2, "must be a list"),
    "string": ("llmprune_intermediate_sizes", ["96", 128], "llmprune_intermediate_sizes[0]"),
    "float": ("llmprune_kv_heads", [1.5, 2], "llmprune_kv_heads[0]"),
    "bool": ("llmprune_kv_heads", [True, 2], "llmprune_kv_heads[0]"),
    "too_big": ("llmprune_kv_heads", [1, 64], "exceeds"),
    "half_missing": ("llmprune_kv_heads", None, "llmprune_kv_heads is missing"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("case", list(STRUCTURED_CASES))
def test_bad_structured_config(structured_dir, tmp_path, capsys, case, streaming):
    field, value, needle = STRUCTURED_CASES[case]
    cfg_path = structured_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(structured_dir, out, streaming), names=[needle], output=out)


def test_valid_structured_still_loads(structured_dir, tmp_path, capsys):
    model = llmprune.load(structured_dir)
    assert model.model.layers[0].mlp.up_proj.out_features == 96
    code, _, err = run_cli(capsys, *compress_args(structured_dir, tmp_path / "out"))
    assert code == 0, err


# ------------------------------------------------------------------------------------ class 4b: config.json


CONFIG_JSON = {
    "list": ("[1, 2]", "config.json must hold a JSON object"),
    "binary": ("\udcff", "config.json is not a UTF-8 text file"),
    "garbled": ("{model_type", "config.json is not valid JSON"),
    "negative_hidden": ('{"model_type": "llama", "hidden_size": -5}', "hidden size (-5)"),
    "string_layers": ('{"model_type": "llama", "num_hidden_layers": "two"}', "num_hidden_layers"),
    "unknown_type": ('{"model_type": "nonexistent"}', "nonexistent"),
}


@pytest.mark.parametrize("case", list(CONFIG_JSON))
def test_bad_config_json(model_dir, tmp_path, capsys, case):
    text, needle = CONFIG_JSON[case]
    (model_dir / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(model_dir, out), names=[needle], output=out)
    with pytest.raises(LlmpruneError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        llmprune.load(model_dir)


# ----------------------------------------------------------------------------- class 5: bad llmprune.json


LLMPRUNE_JSON = {
    "garbled": b"{not json",
    "list": b"[1, 2, 3]",
    "binary": b"\x00\x01\x02\xff\xfe\xfd" * 10,
    "empty": b"",
    "format_not_str": b'{"format": ["packed"]}',
    "string": b'"dense"',
}


@pytest.mark.parametrize("case", list(LLMPRUNE_JSON))
def test_bad_llmprune_json(checkpoint, wiki, tmp_path, capsys, case):
    (checkpoint / "llmprune.json").write_bytes(LLMPRUNE_JSON[case])
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(checkpoint, out), names=["llmprune.json"], output=out)
    expect_error(capsys, *ppl_args(checkpoint, wiki), names=["llmprune.json"])
    expect_error(capsys, "convert", checkpoint, "--format", "dense", "-o", out, "-q", names=["llmprune.json"],
                 output=out)
    assert not (checkpoint / "eval_results.json").exists()


# ------------------------------------------------------------------------- class 6: packed 2:4 checkpoints


@pytest.fixture(scope="module")
def packed_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    model = tiny_llama()
    llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), device="cpu", progress=False)
    return save_checkpoint(model, tiny_tokenizer(), tmp / "packed", metadata={}, format="packed")


@pytest.fixture
def packed_dir(packed_base, tmp_path):
    d = tmp_path / "packed"
    shutil.copytree(packed_base, d)
    return d


META = "model.layers.1.mlp.gate_proj.meta"
VALUES = "model.layers.1.mlp.gate_proj.values"
MODULE = "model.layers.1.mlp.gate_proj"


def _dup_positions(t):
    m = t[META].clone()
    m[5, 1] = 0  # 8 groups with positions 0, 0
    t[META] = m


def _decreasing(t):
    m = t[META].clone()
    m[0, 0] = (m[0, 0] & ~0xF) | (2 | (0 << 2))  # group 0 of row 0: positions 2, 0
    t[META] = m


def _meta_shape(t):
    t[META] = t[META][:, :1].contiguous()


def _meta_dtype(t):
    t[META] = t[META].to(torch.int64)


def _values_int(t):
    t[VALUES] = t[VALUES].to(torch.int32)


def _values_nan(t):
    v = t[VALUES].clone()
    v[0, 0] = float("nan")
    t[VALUES] = v


def _drop_meta(t):
    del t[META]


PACKED_TENSORS = {
    "duplicate_positions": (_dup_positions, [MODULE, "row 5", "not strictly increasing"]),
    "decreasing_positions": (_decreasing, [MODULE, "row 0, group 0", "positions 2, 0"]),
    "meta_shape": (_meta_shape, [META, "(128, 1)"]),
    "meta_dtype": (_meta_dtype, [META, "I64"]),
    "values_int": (_values_int, [VALUES, "I32"]),
    "values_nan": (_values_nan, [VALUES, "NaN"]),
    "meta_missing": (_drop_meta, [META, "lacks"]),
}


@pytest.mark.parametrize("case", list(PACKED_TENSORS))
def test_corrupt_packed(packed_dir, wiki, tmp_path, capsys, case):
    change, names = PACKED_TENSORS[case]
    rewrite(packed_dir / "model.safetensors", change)
    out = tmp_path / "dense"
    expect_error(capsys, "convert", packed_dir, "--format", "dense", "-o", out, "-q", names=names, output=out)
    expect_error(capsys, *ppl_args(packed_dir, wiki), names=names)
    with pytest.raises(LlmpruneError):
        llmprune.load(packed_dir)


@pytest.mark.parametrize("case", ["duplicate_positions", "meta_shape", "meta_dtype"])
def test_corrupt_packed_through_transformers_quantizer(packed_dir, wiki, capsys, case):
    """Without llmprune.json the checkpoint loads through transformers' quantizer hook: same checks."""
    from transformers import AutoModelForCausalLM

    change, names = PACKED_TENSORS[case]
    rewrite(packed_dir / "model.safetensors", change)
    (packed_dir / "llmprune.json").unlink()
    with pytest.raises(Exception, match=r"gate_proj" if case != "meta_shape" else "mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(packed_dir)  # (a shape mismatch: transformers' own error)
    expect_error(capsys, *ppl_args(packed_dir, wiki), names=["gate_proj"])


QUANT_CASES = {
    "version_abc": ("format_version", "abc", "format_version must be a positive integer"),
    "version_zero": ("format_version", 0, "format_version must be a positive integer"),
    "version_float": ("format_version", 1.5, "format_version must be a positive integer"),
    "version_bool": ("format_version", True, "format_version must be a positive integer"),
    "version_newer": ("format_version", 99, "newer than this llmprune supports"),
    "modules_str": ("modules", "model.layers.0.mlp.up_proj", "modules must be a non-empty list"),
    "modules_int": ("modules", [3], "modules must be a non-empty list"),
    "modules_dup": ("modules", ["model.layers.0.mlp.up_proj"] * 2, "twice"),
    "modules_norm": ("modules", ["model.norm"], "not a linear"),
    "modules_unknown": ("modules", ["model.layers.0.mlp.nope"], "does not have"),
}


@pytest.mark.parametrize("via", ["llmprune", "transformers"])
@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_bad_quantization_config(packed_dir, wiki, tmp_path, capsys, case, via):
    field, value, needle = QUANT_CASES[case]
    cfg_path = packed_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"][field] = value
    cfg_path.write_text(json.dumps(cfg))
    if via == "transformers":  # no llmprune.json: the load goes through transformers and the quantizer hook
        (packed_dir / "llmprune.json").unlink()
    out = tmp_path / "dense"
    expect_error(capsys, "convert", packed_dir, "--format", "dense", "-o", out, "-q", names=[needle], output=out)
    expect_error(capsys, *ppl_args(packed_dir, wiki), names=[needle])


def test_valid_packed_still_loads(packed_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llmprune.runtime.sparse24 import Sparse24Linear

    model = llmprune.load(packed_dir)
    assert sum(isinstance(m, Sparse24Linear) for m in model.modules()) == 14
    plain = AutoModelForCausalLM.from_pretrained(packed_dir).eval()
    ids = torch.randint(0, TINY_VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits)
    code, _, err = run_cli(capsys, "convert", packed_dir, "--format", "dense", "-o", tmp_path / "d", "-q")
    assert code == 0, err
    (packed_dir / "llmprune.json").unlink()  # recognised by its quantization_config alone
    assert sum(isinstance(m, Sparse24Linear) for m in llmprune.load(packed_dir).modules()) == 14


# ------------------------------------------------------------------------------ class 7: pickled checkpoints


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture
def bin_dir(tmp_path):
    d = tmp_path / "bin"
    model = tiny_llama()
    model.config.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


def test_valid_bin_loads_with_weights_only(bin_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *compress_args(bin_dir, tmp_path / "out"))
    assert code == 0, err


@pytest.mark.parametrize("case", ["evil", "truncated", "garbage", "missing_tensor", "int64"])
def test_bad_bin(bin_dir, tmp_path, capsys, case):
    p = bin_dir / "pytorch_model.bin"
    if case == "evil":
        state = torch.load(p, weights_only=True)
        state["boom"] = _Evil()
        torch.save(state, p)
        names = ["pytorch_model.bin", "refused"]
    elif case == "truncated":
        p.write_bytes(p.read_bytes()[:1000])
        names = ["pytorch_model.bin"]
    elif case == "garbage":
        p.write_bytes(os.urandom(2048))
        names = ["pytorch_model.bin"]
    else:
        state = torch.load(p, weights_only=True)
        if case == "missing_tensor":
            del state[UP]
        else:
            state[UP] = state[UP].to(torch.int64)
        torch.save(state, p)
        names = [UP]
    out = tmp_path / "out"
    expect_error(capsys, *compress_args(bin_dir, out), names=names, output=out)


# --------------------------------------------------------------------------- class 8: gates-only directories


def _gates_dir(d: Path, base) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({"layers.0.dist_bias": torch.zeros(2, 24)}, str(d / "attn_gates.safetensors"))
    meta = {"gate_config": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}}
    if base is not None:
        meta["base_model"] = str(base)
    (d / "attn_gates.json").write_text(json.dumps(meta))
    return d


def test_gates_chains(tmp_path, wiki, capsys, model_dir):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cases = []
    _gates_dir(a, a)  # names itself
    cases.append((a, "itself"))
    _gates_dir(b, c)
    _gates_dir(c, b)  # a cycle
    cases.append((b, "not a model directory either"))
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    _gates_dir(d1, d2)
    _gates_dir(d2, model_dir)  # a valid gates dir, but a chain of two levels
    cases.append((d1, "not a model directory either"))
    e = _gates_dir(tmp_path / "e", tmp_path / "nowhere")
    cases.append((e, "does not exist"))
    f = _gates_dir(tmp_path / "f", 12)
    (f / "attn_gates.json").write_text(json.dumps({"base_model": 12}))
    cases.append((f, "'base_model' must be a model name"))
    g = _gates_dir(tmp_path / "g", None)
    (g / "attn_gates.json").write_text("[")
    cases.append((g, "attn_gates.json is not valid JSON"))
    for d, needle in cases:
        expect_error(capsys, *ppl_args(d, wiki), names=[needle])
        out = tmp_path / "out"
        expect_error(capsys, *compress_args(d, out), names=[needle], output=out)
    from llmprune.model.loading import resolve_model

    assert resolve_model(d2) == str(model_dir)  # one level is fine


# --------------------------------------------------------------------------------------- no false positives


def test_valid_checkpoints_still_load(model_dir, sharded_dir, tmp_path, capsys):
    tied = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(tied)
    tiny_tokenizer().save_pretrained(tied)
    for i, d in enumerate((model_dir, sharded_dir, tied)):
        for streaming in (False, True):
            out = tmp_path / f"out{i}{int(streaming)}"
            code, _, err = run_cli(capsys, *compress_args(d, out, streaming))
            assert code == 0, (d, streaming, err)
            assert llmprune.load(out) is not None
    # a base-model checkpoint (no "model." prefix) still loads into the causal LM
    from transformers import LlamaModel

    bare = tmp_path / "bare"
    LlamaModel(tiny_llama().config).save_pretrained(bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmpruneError, match="lacks tensor lm_head.weight"):
        llmprune.load(bare)  # the head is really missing: refused, not randomly initialised
