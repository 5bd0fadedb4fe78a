"""Output-directory safety: --overwrite replaces only llmprune checkpoints, atomically, with no debris."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from helpers import run_cli, tiny_llama

from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import save_checkpoint
from llmprune.formats.output import check_output, make_work_dir, move_into_place


def _ckpt(path, marker="old"):
    path.mkdir(parents=True)
    (path / "llmprune.json").write_text(json.dumps({"marker": marker}))
    (path / "weights").write_text(marker)
    return path


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "thesis.tex").write_text("years of work")
    with pytest.raises(LlmpruneError, match="not an llmprune checkpoint"):
        check_output(data, overwrite=True)
    assert (data / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_cwd_ancestors_and_home(tmp_path, monkeypatch):
    work = _ckpt(tmp_path / "proj")
    sub = work / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    for target in (sub, work, tmp_path):
        (target / "llmprune.json").write_text("{}")
        with pytest.raises(LlmpruneError, match="current, home or root"):
            check_output(target, overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = _ckpt(tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmpruneError, match="current, home or root"):
        check_output(home, overwrite=True)


def test_output_never_is_or_contains_an_input(tmp_path):
    model = _ckpt(tmp_path / "zoo" / "tiny")
    for target in (model, tmp_path / "zoo"):
        with pytest.raises(LlmpruneError, match="the input"):
            check_output(target, overwrite=True, inputs=[model])
    assert (model / "weights").read_text() == "old"


def test_unwritable_parent_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LlmpruneError, match="not a directory"):
        check_output(blocker / "out", overwrite=False)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(LlmpruneError, match="not writable"):
            check_output(ro / "out", overwrite=False)


def test_swap_replaces_old_with_new_and_leaves_no_debris(tmp_path):
    out = _ckpt(tmp_path / "out", "old")
    new = make_work_dir(out)
    (new / "llmprune.json").write_text(json.dumps({"marker": "new"}))
    move_into_place(new, out)
    assert json.loads((out / "llmprune.json").read_text()) == {"marker": "new"}
    assert not (out / "weights").exists()
    assert _tree(tmp_path) == ["out", "out/llmprune.json"]


def test_leftovers_of_a_dead_save_are_removed(tmp_path):
    out = _ckpt(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".out.tmp-{pid}-abcd").mkdir()
    (tmp_path / f".out.tmp-{pid}-abcd" / "model.safetensors").write_text("half")
    check_output(out, overwrite=True)
    assert _tree(tmp_path) == ["out", "out/llmprune.json", "out/weights"]


def test_old_copy_without_checkpoint_is_named_not_deleted(tmp_path):
    old = tmp_path / ".out.old-999999999-abcd"
    _ckpt(old / "x")
    with pytest.raises(LlmpruneError, match="interrupted save left the previous checkpoint"):
        check_output(tmp_path / "out", overwrite=True)
    assert (old / "x" / "weights").read_text() == "old"


def test_new_directories_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_checkpoint(tiny_llama(), None, tmp_path / "ckpt", metadata={})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_cli_overwrite_of_input_model_is_refused(tiny_model_dir, tmp_path, capsys):
    before = _tree(tiny_model_dir.parent)
    for target in (tiny_model_dir, tiny_model_dir.parent):
        code, out, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--device", "cpu",
                                 "-o", target, "--overwrite", "-q")
        assert code == 2 and err.startswith("llmprune: error:") and "the input" in err, err
        assert len(err.strip().splitlines()) == 1
    assert _tree(tiny_model_dir.parent) == before
