"""Never lose a user's data, never save a corrupt model, one clear error for every bad input.

Streaming resume state (``<output>.partial/state.json``): paths inside it are relative and confined, a damaged
file is one error line, a second run on the same output is refused by a lock, an interruption after the last
layer resumes cleanly. Early validation: every bad flag fails before loading, with exit 2, one line, nothing
written. Weights: a NaN/inf linear is refused before it is pruned; a pruned linear that misses its pattern is
an internal error and never saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import assert_same_checkpoint, checkpoint_tensors, run_cli, tiny_llama, tiny_text, tiny_tokenizer
from safetensors.torch import save_file

import llmprune
from llmprune.config import CalibConfig, PruneConfig, Recipe
from llmprune.engine import activations, calibration_phase
from llmprune.engine import run as run_mod
from llmprune.engine.step import PruneIntegrityError
from llmprune.engine.streaming import SimulatedInterruption, StreamOptions, compress_streaming
from llmprune.engine.workdir import STATE_FILE, RunLock
from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.output import move_into_place
from llmprune.prune.registry import available_methods, register

CPU = torch.device("cpu")
N_LAYERS = 4


def _recipe(calib, method="wanda"):
    cfg = llmprune.WandaConfig(sparsity="2:4") if method == "wanda" else llmprune.MagnitudeConfig(sparsity="2:4")
    return Recipe(stages=[cfg], calibration=CalibConfig(source=str(calib), nsamples=6, seqlen=16, batch_size=4))


def _cli(model, calib, *extra):
    """The CLI equivalent of ``compress_streaming(..., _recipe(calib))`` (same fingerprint)."""
    return ["compress", model, "--method", "wanda", "--sparsity", "2:4", "--calib", calib, "--nsamples", 6,
            "--seqlen", 16, "--batch-size", 4, "--device", "cpu", "-q", *extra]


def _one_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4-layer model, calibration text, a reference output and an interrupted run (2 of 4 layers done)."""
    root = tmp_path_factory.mktemp("safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        model = root / "model"
        tiny_llama(num_hidden_layers=N_LAYERS).save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
        calib = root / "calib.txt"
        calib.write_text(tiny_text(6000))
        ref = compress_streaming(None, model, _recipe(calib), root / "ref", device=CPU, progress=False).output
        with pytest.raises(SimulatedInterruption):
            compress_streaming(None, model, _recipe(calib), root / "tpl", device=CPU, progress=False,
                               options=StreamOptions(stop_after=2))
    return {"root": root, "model": model, "calib": calib, "ref": ref, "template": root / "tpl.partial"}


def _clone(base, tmp_path, name="out"):
    """A copy of the interrupted run's work directory for output ``tmp_path / name``."""
    partial = tmp_path / f"{name}.partial"
    shutil.copytree(base["template"], partial, symlinks=True)
    return tmp_path / name, partial


def _edit_state(partial, fn):
    state = json.loads((partial / STATE_FILE).read_text())
    fn(state)
    (partial / STATE_FILE).write_text(json.dumps(state))


# ------------------------------------------------------------------------------------- paths in state.json


def test_state_json_paths_are_relative(base):
    state = json.loads((base["template"] / STATE_FILE).read_text())
    assert state["hidden"] == {"base": "partial", "path": "hidden"}
    assert not os.path.isabs(state["calibration"]["source"])
    assert str(base["root"]) not in (base["template"] / STATE_FILE).read_text()


PLANTS = ["absolute", "dotdot", "symlink", "nested-escape", "offload-absolute", "legacy-hidden_dir"]


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_hidden_path_is_refused_and_untouched(base, tmp_path, plant, capsys):
    planted = tmp_path / "precious"
    planted.mkdir()
    (planted / "L2").mkdir()
    (planted / "L2" / "b0.safetensors").write_text("user data")  # even files named like ours
    (planted / "thesis.tex").write_text("years of work")
    out, partial = _clone(base, tmp_path)
    extra = []
    if plant == "absolute":
        _edit_state(partial, lambda s: s.update(hidden={"base": "partial", "path": str(planted)}))
    elif plant == "dotdot":
        _edit_state(partial, lambda s: s.update(hidden={"base": "partial", "path": "../precious"}))
    elif plant == "nested-escape":
        _edit_state(partial, lambda s: s.update(hidden={"base": "partial", "path": "hidden/../../precious"}))
    elif plant == "symlink":
        shutil.rmtree(partial / "hidden")
        (partial / "hidden").symlink_to(planted)
    elif plant == "offload-absolute":
        _edit_state(partial, lambda s: s.update(hidden={"base": "offload", "path": str(planted)}))
        extra = ["--offload-dir", tmp_path / "offload"]
    else:  # the pre-fix format: an absolute hidden_dir
        _edit_state(partial, lambda s: (s.pop("hidden"), s.update(version=1, hidden_dir=str(planted))))
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume", *extra))
    line = _one_error(code, err)
    assert ("outside" in line) if plant != "legacy-hidden_dir" else ("not a valid llmprune run state" in line)
    assert "delete" in line
    assert sorted(p.name for p in planted.rglob("*")) == ["L2", "b0.safetensors", "thesis.tex"]
    assert (planted / "thesis.tex").read_text() == "years of work"
    assert (partial / STATE_FILE).is_file() and not out.exists()  # the interrupted run is kept, too


@pytest.mark.parametrize("offload", [False, True], ids=["partial", "offload-dir"])
def test_resume_from_another_cwd_is_identical(base, tmp_path, monkeypatch, capsys, offload):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copytree(base["model"], a / "model")
    shutil.copy(base["calib"], a / "calib.txt")
    monkeypatch.chdir(a)
    opts = StreamOptions(stop_after=2, offload_dir="offload" if offload else None)
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, "model", _recipe("calib.txt"), "out", device=CPU, progress=False, options=opts)
    state = json.loads((a / "out.partial" / STATE_FILE).read_text())
    assert state["hidden"]["base"] == ("offload" if offload else "partial")
    if offload:
        assert (a / "offload" / state["hidden"]["path"] / "L2").is_dir()
    monkeypatch.chdir(b)
    extra = ["--offload-dir", "../a/offload"] if offload else []
    code, out, err = run_cli(capsys, *_cli("../a/model", "../a/calib.txt", "-o", "../a/out", "--resume", *extra))
    assert code == 0, err
    assert "saved dense checkpoint" in out
    assert_same_checkpoint(base["ref"], a / "out")
    assert not (a / "out.partial").exists()
    if offload:
        assert list((a / "offload").iterdir()) == []  # our activations are gone, the directory stays


def test_offload_resume_needs_the_offload_dir(base, tmp_path, capsys):
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "out", device=CPU, progress=False,
                           options=StreamOptions(stop_after=1, offload_dir=tmp_path / "off"))
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", tmp_path / "out", "--resume"))
    assert "pass the same --offload-dir" in _one_error(code, err)


# ----------------------------------------------------------------------------------- damaged state


def _set(key, value):
    return lambda s: s.update({key: value})


STATE_DAMAGE = {
    "garbage": b"{not json",
    "binary": b"\xff\xfe\x00garbage",
    "empty": b"",
    "list": b"[]",
    "version": _set("version", 99),
    "next_layer-too-big": _set("next_layer", 99),
    "next_layer-negative": _set("next_layer", -1),
    "next_layer-bool": _set("next_layer", True),
    "n_layers-string": _set("n_layers", "4"),
    "n_layers-mismatch": _set("n_layers", 9),
    "reports-not-list": _set("reports", {"a": 1}),
    "report-missing-key": lambda s: s["reports"][0].pop("shape"),
    "report-bad-sparsity": lambda s: s["reports"][0].update(sparsity=7),
    "store": _set("store", "gpu"),
    "calibration-negative": lambda s: s["calibration"].update(nsamples=-1),
    "calibration-unknown-key": lambda s: s["calibration"].update(evil=1),
    "calibration-null": _set("calibration", None),
    "hidden-base": _set("hidden", {"base": "elsewhere", "path": "hidden"}),
    "hidden-not-dict": _set("hidden", "hidden"),
    "extra-key": _set("rm_rf", "/"),
    "seconds-nan": _set("seconds", float("nan")),
    "fingerprint-garbled": _set("fingerprint", "x"),
    "fingerprint-other-run": _set("fingerprint", "0" * 64),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_damaged_state_json_is_one_error_line(base, tmp_path, damage, capsys):
    out, partial = _clone(base, tmp_path)
    change = STATE_DAMAGE[damage]
    if isinstance(change, bytes):
        (partial / STATE_FILE).write_bytes(change)
    else:
        _edit_state(partial, change)
    before = sorted(p.relative_to(partial) for p in partial.rglob("*"))
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume"))
    line = _one_error(code, err)
    assert time.perf_counter() - t0 < 5
    if damage == "fingerprint-other-run":
        assert "belongs to a different run" in line
    else:
        assert "delete" in line and str(partial) in line, line
    assert sorted(p.relative_to(partial) for p in partial.rglob("*")) == before  # nothing deleted
    assert not out.exists()


def _garble(path):
    path.write_bytes(b"\x00garbage" * 8)


FILE_DAMAGE = {
    "calib-garbled": lambda p: _garble(p / "calib.pt"),
    "calib-missing": lambda p: (p / "calib.pt").unlink(),
    "calib-wrong-shape": lambda p: torch.save(torch.zeros(2, 3, dtype=torch.long), p / "calib.pt"),
    "inputs-garbled": lambda p: _garble(p / "inputs-rank0.pt"),
    "inputs-not-dict": lambda p: torch.save([1, 2], p / "inputs-rank0.pt"),
    "hidden-garbled": lambda p: _garble(p / "hidden" / "L2" / "b0.safetensors"),
    "hidden-missing": lambda p: (p / "hidden" / "L2" / "b1.safetensors").unlink(),
    "hidden-wrong-shape": lambda p: save_file({"hidden": torch.zeros(4, 3, 64)}, str(p / "hidden" / "L2" / "b0.safetensors")),
    "hidden-wrong-key": lambda p: save_file({"x": torch.zeros(4, 16, 64)}, str(p / "hidden" / "L2" / "b0.safetensors")),
}


@pytest.mark.parametrize("damage", list(FILE_DAMAGE))
def test_damaged_work_files_are_one_error_line(base, tmp_path, damage, capsys):
    out, partial = _clone(base, tmp_path)
    FILE_DAMAGE[damage](partial)
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume"))
    line = _one_error(code, err)
    assert "delete" in line, line
    assert partial.is_dir() and not out.exists()


@pytest.mark.parametrize("foreign", ["notes.txt", "state.json/notes.txt", "hidden/notes.txt", "hidden/L0/notes.txt"])
def test_foreign_partial_dir_is_never_cleared(base, tmp_path, capsys, foreign):
    """A ``<output>.partial`` without a state.json file that holds files llmprune does not write is not ours."""
    partial = tmp_path / "out.partial"
    (partial / foreign).parent.mkdir(parents=True, exist_ok=True)
    (partial / foreign).write_text("mine")
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", tmp_path / "out", "--low-memory"))
    assert "did not write" in _one_error(code, err)
    assert (partial / foreign).read_text() == "mine"


def test_foreign_files_beside_our_activations_survive(base, tmp_path):
    off = tmp_path / "off"
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "out", device=CPU, progress=False,
                           options=StreamOptions(stop_after=1, offload_dir=off))
    (hidden,) = off.iterdir()
    (hidden / "keep.txt").write_text("x")  # someone else's file inside our directory
    compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "out", device=CPU, progress=False,
                       options=StreamOptions(resume=True, offload_dir=off))
    assert (hidden / "keep.txt").read_text() == "x" and not list(hidden.glob("L*"))


# ------------------------------------------------------------------------------------------- the lock


def test_second_run_on_the_same_output_is_refused(base, tmp_path, capsys):
    out, partial = _clone(base, tmp_path)
    held = RunLock(partial / "lock")
    held.acquire()  # another open file description: conflicts even within one process
    try:
        code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume"))
        assert "another llmprune run is writing" in _one_error(code, err)
        code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", tmp_path / "fresh", "--low-memory"))
        assert code == 0, err  # other outputs are not affected
    finally:
        held.release()
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume"))
    assert code == 0, err
    assert_same_checkpoint(base["ref"], out)


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_is_released_when_the_holder_dies(base, tmp_path, capsys):
    out, partial = _clone(base, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(partial / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume"))
        assert "another llmprune run" in _one_error(code, err)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait()
    code, _, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume"))
    assert code == 0, err


def test_lock_is_released_after_an_error_in_the_same_process(base, tmp_path):
    with pytest.raises(SimulatedInterruption):
        compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "out", device=CPU, progress=False,
                           options=StreamOptions(stop_after=1))
    res = compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "out", device=CPU, progress=False,
                             options=StreamOptions(resume=True))
    assert_same_checkpoint(base["ref"], res.output)


# ------------------------------------------------------------------ interrupted after the last layer


@pytest.mark.parametrize("where", ["after-last-commit", "in-finalize", "after-move", "after-move-offload"])
def test_interruption_between_last_layer_and_rename_resumes(base, tmp_path, monkeypatch, capsys, where):
    out = tmp_path / "out"
    offload = tmp_path / "off" if where.endswith("offload") else None
    opts = StreamOptions(stop_after=N_LAYERS if where == "after-last-commit" else None, offload_dir=offload)
    if where == "in-finalize":
        def crash(*a):
            raise KeyboardInterrupt
        monkeypatch.setattr(run_mod, "move_into_place", crash)
    elif where.startswith("after-move"):
        real = run_mod.remove_work_dir

        def crash(*a):
            raise KeyboardInterrupt
        monkeypatch.setattr(run_mod, "remove_work_dir", crash)
    with pytest.raises((SimulatedInterruption, KeyboardInterrupt)):
        compress_streaming(None, base["model"], _recipe(base["calib"]), out, device=CPU, progress=False, options=opts)
    state = json.loads((tmp_path / "out.partial" / STATE_FILE).read_text())
    assert state["next_layer"] == N_LAYERS
    assert out.exists() == where.startswith("after-move")
    if where == "in-finalize":
        monkeypatch.setattr(run_mod, "move_into_place", move_into_place)
    elif where.startswith("after-move"):
        monkeypatch.setattr(run_mod, "remove_work_dir", real)
    extra = ["--offload-dir", offload] if offload else []
    code, stdout, err = run_cli(capsys, *_cli(base["model"], base["calib"], "-o", out, "--resume", *extra))
    assert code == 0, err
    assert "saved dense checkpoint" in stdout
    assert_same_checkpoint(base["ref"], out)
    assert not (tmp_path / "out.partial").exists()
    if offload:
        assert list(offload.iterdir()) == []


# ---------------------------------------------------------------------------------- early validation


def _early(tmp_path, base, *, model=None):
    """Common arguments of the early-validation cases (wanda, real calibration file, fresh output)."""
    return ["compress", model or base["model"], "--method", "wanda", "--calib", base["calib"], "--nsamples", 4,
            "--seqlen", 16, "--device", "cpu", "-q", "-o", tmp_path / "never"]


def _file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


EARLY = {
    "max-memory-abc": (["--max-memory", "abc"], "--max-memory: invalid size 'abc'"),
    "max-memory-abc-streaming": (["--max-memory", "abc", "--low-memory"], "--max-memory: invalid size 'abc'"),
    "max-memory-overflow": (["--max-memory", "1e999"], "invalid size '1e999'"),
    "max-memory-negative": (["--max-memory=-5GB"], "invalid size '-5GB'"),
    "offload-is-a-file": (lambda t, b: ["--offload-dir", _file(t), "--low-memory"], "is not a directory"),
    "offload-under-a-file": (lambda t, b: ["--offload-dir", _file(t) / "sub", "--low-memory"], "cannot be created"),
    "offload-inside-model": (lambda t, b: ["--offload-dir", b["model"] / "off", "--low-memory"], "inside the input"),
    "offload-inside-output": (lambda t, b: ["--offload-dir", t / "never" / "off", "--low-memory"], "inside the output"),
    "offload-empty": (["--offload-dir", "", "--low-memory"], "--offload-dir must be a directory"),
    "nm-3of7-in-memory": (["--sparsity", "3:7", "--no-low-memory"], "weight [64, 64] (64 % 7 = 1"),
    "nm-3of7-streaming": (["--sparsity", "3:7", "--low-memory"], "weight [64, 64] (64 % 7 = 1"),
    "nm-1of128-in-memory": (["--sparsity", "1:128", "--no-low-memory"], "multiple of 128"),
    "ignore-nothing-in-memory": (["--ignore", "mlp.nosuch_proj", "--no-low-memory"], "'mlp.nosuch_proj' matches no module"),
    "ignore-nothing-streaming": (["--ignore", "*.99.*", "--low-memory"], "'*.99.*' matches no module"),
    "nsamples-too-many": (["--nsamples", 2_000_000], "nsamples must be at most 1,000,000"),
    "seqlen-too-long": (["--seqlen", 20_000_000], "seqlen must be at most 10,000,000"),
    "calib-missing": (lambda t, b: ["--calib", t / "missing.txt"], "calibration file not found"),
    "record-paths-bogus": (["--record-paths", "hidden"], "invalid choice: 'hidden'"),
    "dist-reduce-bogus": (["--dist-reduce", "avg"], "invalid choice: 'avg'"),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_early_validation_fails_fast_and_writes_nothing(base, tmp_path, case, capsys, monkeypatch):
    args, needle = EARLY[case]
    args = args(tmp_path, base) if callable(args) else args
    loaded = []
    monkeypatch.setattr("llmprune.api.load_pretrained", lambda *a, **k: loaded.append(1))  # must not be reached
    monkeypatch.setattr("llmprune.api.load_calibration_resolved", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(run_mod.StreamingRun, "_calibration_ids", lambda *a, **k: loaded.append(1))
    model_files = sorted(p.name for p in base["model"].iterdir())
    before = set(tmp_path.iterdir())
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, *_early(tmp_path, base), *args)
    elapsed = time.perf_counter() - t0
    line = _one_error(code, err)
    assert needle in line, line
    assert elapsed < 1.0, f"{case}: {elapsed:.2f}s"
    assert not loaded
    assert set(tmp_path.iterdir()) == before  # no output, no .partial, no offload dir
    assert sorted(p.name for p in base["model"].iterdir()) == model_files


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_offload_dir_not_writable(base, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, *_early(tmp_path, base), "--offload-dir", ro / "off", "--low-memory")
        assert "not writable" in _one_error(code, err)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_activation_memory_beyond_the_budget(base, tmp_path, capsys, monkeypatch, caplog, streaming):
    """nsamples x seqlen x hidden x bytes is estimated before any work: logged, and refused where it cannot fit
    (RAM in memory; the disk for the streaming engine, which spills activations there)."""
    monkeypatch.setattr(activations, "available_ram", lambda: 2**30)
    if streaming:
        monkeypatch.setattr(activations.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**40 - 2**20, 2**20))
    args = [*_early(tmp_path, base), "--nsamples", 100_000, "--seqlen", 256, "--low-memory" if streaming else "--no-low-memory"]
    code, _, err = run_cli(capsys, *args)
    line = _one_error(code, err)
    assert "6.10 GiB (nsamples 100000 x seqlen 256 x hidden 64 x 4 bytes)" in line, line
    assert ("free" in line) if streaming else ("1.00 GiB of RAM is available" in line), line
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()
    # within the budget: the estimate is logged at INFO
    caplog.set_level("INFO", logger="llmprune.engine.activations")
    code, _, err = run_cli(capsys, *_early(tmp_path, base), "--no-low-memory")
    assert code == 0, err
    assert "calibration activations: 0.00 GiB (nsamples 4 x seqlen 16 x hidden 64 x 4 bytes)" in caplog.text


def test_streaming_spills_to_disk_beyond_half_the_ram(base, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_phase, "available_ram", lambda: 1024)  # 6 x 16 x 64 x 4 bytes > 512
    modes = []
    real = calibration_phase.HiddenStore.__init__

    def spy(self, mode, *a, **k):
        modes.append(mode)
        real(self, mode, *a, **k)

    monkeypatch.setattr(calibration_phase.HiddenStore, "__init__", spy)
    res = compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "out", device=CPU, progress=False)
    assert modes == ["disk"]
    # Activations on disk cannot all be in flight at once: "auto" takes the two-pass order, and records it.
    assert llmprune.formats.checkpoint.read_metadata(res.output)["calibration"]["sequential"] == "layer"
    monkeypatch.undo()
    layer = _recipe(base["calib"])
    layer.calibration = dataclasses.replace(layer.calibration, sequential="layer")
    ref = compress_streaming(None, base["model"], layer, tmp_path / "ref", device=CPU, progress=False)
    ta, tb = checkpoint_tensors(ref.output), checkpoint_tensors(res.output)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_api_validates_before_loading(base, tmp_path):
    for kwargs, needle in [({"max_memory": "abc"}, "invalid size"), ({"offload_dir": base["model"]}, "inside the input"),
                           ({"record_paths": "nope"}, "record_paths"), ({"dist_reduce": "avg"}, "dist_reduce")]:
        t0 = time.perf_counter()
        with pytest.raises(LlmpruneError, match=needle):
            llmprune.compress(str(base["model"]), _recipe(base["calib"]), tmp_path / "o", device="cpu", progress=False,
                              **kwargs)
        assert time.perf_counter() - t0 < 1.0
    with pytest.raises(LlmpruneError, match="invalid size"):
        compress_streaming(None, base["model"], _recipe(base["calib"]), tmp_path / "o", device=CPU, progress=False,
                           options=StreamOptions(max_memory="abc"))
    # the streaming engine checks the meta-device model itself, before its work directory exists
    for cfg, needle in [(llmprune.WandaConfig(sparsity="3:7"), "64 % 7 = 1"),
                        (llmprune.WandaConfig(sparsity="2:4", ignore=["nosuch"]), "'nosuch' matches no module")]:
        recipe = Recipe(stages=[cfg], calibration=_recipe(base["calib"]).calibration)
        with pytest.raises(ConfigError, match=needle):
            compress_streaming(None, base["model"], recipe, tmp_path / "o", device=CPU, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- non-finite weights


def _poisoned_dir(tmp_path, value=float("nan"), where="model.layers.1.mlp.up_proj"):
    model = tiny_llama(num_hidden_layers=2)
    w = model.get_submodule(where).weight
    with torch.no_grad():
        w[3, 5] = value
    d = tmp_path / "poisoned"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_refuses_non_finite_linear(value, method):
    model = tiny_llama(num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = value
    cfg = {"wanda": llmprune.WandaConfig, "sparsegpt": llmprune.SparseGPTConfig,
           "magnitude": llmprune.MagnitudeConfig}[method](sparsity="2:4")
    calib = torch.randint(3, 100, (4, 16))
    with pytest.raises(LlmpruneError, match=r"model\.layers\.1\.mlp\.up_proj: the weight holds 1 NaN/inf"):
        llmprune.prune(model, cfg, calib, device="cpu", progress=False)


def test_prune_ignores_non_finite_in_an_ignored_linear():
    model = tiny_llama(num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(float("nan"))
    rep = llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4", ignore=["model.layers.1.mlp.up_proj"]),
                         device="cpu", progress=False)
    assert "model.layers.1.mlp.up_proj" not in [m.name for m in rep.modules]


def test_structured_method_refuses_non_finite_linear():
    model = tiny_llama(num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(LlmpruneError, match=r"model\.layers\.0\.mlp\.down_proj"):
        llmprune.prune(model, llmprune.CFSPConfig(sparsity=0.25), torch.randint(3, 100, (4, 16)), device="cpu",
                       progress=False)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_cli_refuses_non_finite_linear_and_saves_nothing(base, tmp_path, capsys, streaming):
    src = _poisoned_dir(tmp_path)
    code, _, err = run_cli(capsys, *_early(tmp_path, base, model=src), "--low-memory" if streaming else "--no-low-memory")
    line = _one_error(code, err)  # refused by the loader or, at the latest, by the engine step before pruning
    assert "model.layers.1.mlp.up_proj" in line and "NaN" in line, line
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


# ----------------------------------------------------------------------------- verified before saving


@dataclass
class _BrokenConfig(PruneConfig):
    method: ClassVar[str] = "test-broken"
    mode: str = "dense"  # "dense": keeps everything (not N:M); "nan": returns NaN weights


def _broken(weight, stats, cfg):
    mask = torch.ones_like(weight, dtype=torch.bool)
    return (weight.clone() if cfg.mode == "dense" else torch.full_like(weight, float("nan"))), mask


@pytest.fixture
def broken_method():
    """``test-broken`` registered for one test only (a leftover registration would show in every method list)."""
    from llmprune.prune import registry

    available_methods()  # the built-ins first, so they are not registered around ours
    register("test-broken", _BrokenConfig, _broken)
    yield
    registry._METHODS.pop("test-broken", None)


@pytest.mark.parametrize("mode", ["dense", "nan"])
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_violated_pattern_is_an_internal_error_never_saved(base, tmp_path, mode, streaming, broken_method):
    recipe = Recipe(stages=[_BrokenConfig(sparsity="2:4", mode=mode)])
    with pytest.raises(PruneIntegrityError, match="internal error: model.layers.0.self_attn.q_proj"):
        llmprune.compress(str(base["model"]), recipe, tmp_path / "out", device="cpu", progress=False,
                          low_memory=streaming)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
