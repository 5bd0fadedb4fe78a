"""Every bad input ends in success or ONE ``llmprune: error: ...`` line (exit 2; 130 on Ctrl-C), never a
traceback; an unexpected exception is one ``llmprune: internal error: ...`` line with exit 3 (``-v``: plus
the traceback). Files a command writes are checked before any work."""

import errno
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
from helpers import run_cli, tiny_text

import llmprune.commands.ppl as ppl_cmd
from llmprune.errors import LlmpruneError

FAST = ["--device", "cpu", "-q"]


def assert_one_error(code, err, needle=None, *, exit_code=2, prefix="llmprune: error: "):
    """Exit ``exit_code``, exactly one stderr line, starting with ``prefix`` (and containing ``needle``)."""
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err
    if needle is not None:
        assert needle in lines[0], err
    return lines[0]


def _raise(exc):
    def run(args):
        raise exc

    return run


@pytest.fixture
def wiki(tmp_path):
    p = tmp_path / "wiki.txt"
    p.write_text("\n".join(tiny_text(300, seed=i) for i in range(3)))
    return p


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model counts as work: a check that comes after it shows up as an internal error (exit 3)."""
    def load_model(*a, **kw):
        raise AssertionError("work started before the check")

    # the commands import these when they run (fast --help), so patch them where they are defined; modules that
    # bind load_model at import are imported first (else they would keep the fake after the test)
    import llmprune.evaluate.bench  # noqa: F401
    import llmprune.workflow  # noqa: F401

    monkeypatch.setattr("llmprune.runtime.load.load_model", load_model)
    monkeypatch.setattr("llmprune.evaluate.bench.bench", load_model)


def _unwritable(monkeypatch, *dirs):
    """Make file creation in ``dirs`` fail as in a read-only directory (chmod does not stop root)."""
    blocked = {str(Path(d).resolve()) for d in dirs}
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and str(Path(dir).resolve()) in blocked:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# ------------------------------------------------------------------------------- last-resort handler

HANDLED = [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.bin"), "/data/x.bin: Permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope/y"), "/nope/y: No such file or directory"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), "/tmp: Is a directory"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/z"), "/ro/z: read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
    (MemoryError(), "out of memory"),
    (LlmpruneError("first line\nsecond line"), "first line"),
]


@pytest.mark.parametrize("exc,needle", HANDLED, ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "")
def test_environment_errors_are_one_line(exc, needle, monkeypatch, capsys):
    monkeypatch.setattr(ppl_cmd, "run", _raise(exc))
    code, _, err = run_cli(capsys, "ppl", "m")
    line = assert_one_error(code, err, needle)
    assert "second line" not in line


def _hub_errors():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    http = HfHubHTTPError.__new__(HfHubHTTPError)
    Exception.__init__(http, "401 Client Error: Unauthorized for url: https://huggingface.co/api/whoami-v2")
    return [
        (httpx2.ConnectError("[Errno -2] Name or service not known"), "cannot reach the Hugging Face Hub: [Errno -2]"),
        (httpx2.ReadTimeout("timed out"), "cannot reach the Hugging Face Hub: timed out"),
        (OfflineModeIsEnabled("offline"), "cannot reach the Hugging Face Hub: offline mode is enabled"),
        (http, "Hugging Face Hub request failed: 401 Client Error"),
        (LocalTokenNotFoundError("no token"), "no Hugging Face token"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_hub_client_errors_are_one_line(case, monkeypatch, capsys):
    exc, needle = _hub_errors()[case]
    monkeypatch.setattr(ppl_cmd, "run", _raise(exc))
    code, _, err = run_cli(capsys, "ppl", "m")
    assert_one_error(code, err, needle)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("k"), TypeError("bad operand"), ZeroDivisionError()])
def test_unexpected_exception_is_an_internal_error(exc, monkeypatch, capsys):
    monkeypatch.setattr(ppl_cmd, "run", _raise(exc))
    code, _, err = run_cli(capsys, "ppl", "m")
    line = assert_one_error(code, err, type(exc).__name__, exit_code=3, prefix="llmprune: internal error: ")
    assert line.endswith("(rerun with -v for the traceback)")
    code, _, err = run_cli(capsys, "ppl", "m", "-v")  # -v: the traceback, then the same line
    assert code == 3 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == line


def test_interrupt_is_130(monkeypatch, capsys):
    monkeypatch.setattr(ppl_cmd, "run", _raise(KeyboardInterrupt()))
    code, _, err = run_cli(capsys, "ppl", "m")
    assert code == 130 and err.strip() == "llmprune: interrupted"


def test_a_commands_own_exit_code_passes(monkeypatch, capsys):
    monkeypatch.setattr(ppl_cmd, "run", lambda args: 5)
    assert run_cli(capsys, "ppl", "m")[0] == 5


# ------------------------------------------------------------------ results files: checked before any work


def _writers(checkpoint, wiki, flagfile):
    return {
        "ppl --json": ["ppl", checkpoint, "--data-path", wiki, "--seqlen", 16, "--json", flagfile],
        "eval --output": ["eval", checkpoint, "--tasks", "copa", "--output", flagfile],
        "eval --json": ["eval", checkpoint, "--tasks", "copa", "--json", flagfile],
        "bench --json": ["bench", checkpoint, "--json", flagfile],
    }


@pytest.mark.parametrize("command", ["ppl --json", "eval --output", "eval --json", "bench --json"])
@pytest.mark.parametrize("kind", ["directory", "under-a-file", "unwritable-dir", "empty-name"])
def test_bad_results_file_fails_before_work(command, kind, checkpoint, wiki, tmp_path, no_work, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ro").mkdir()
    target = {"directory": tmp_path, "under-a-file": tmp_path / "afile" / "r.json",
              "unwritable-dir": tmp_path / "ro" / "sub" / "r.json", "empty-name": ""}[kind]
    _unwritable(monkeypatch, tmp_path / "ro")
    argv = _writers(checkpoint, wiki, target)[command]
    code, _, err = run_cli(capsys, *argv, *FAST)
    flag = "--json"  # eval: --output is the older spelling of --json
    assert_one_error(code, err, flag)
    assert not (tmp_path / "ro" / "sub").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_results_file_fails_before_work(checkpoint, wiki, tmp_path, no_work, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    out.chmod(0o444)
    code, _, err = run_cli(capsys, "ppl", checkpoint, "--data-path", wiki, "--json", out, *FAST)
    assert_one_error(code, err, "is not writable")


def test_results_file_in_new_directories(checkpoint, wiki, tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "r.json"
    code, _, err = run_cli(capsys, "ppl", checkpoint, "--data-path", wiki, "--seqlen", 16, "--max-windows", 2,
                           "--json", out, *FAST)
    assert code == 0, err
    assert json.loads(out.read_text())["windows"] == 2


# ------------------------------------------------------------- read-only checkpoint: warn, skip recording


@pytest.fixture
def read_only_checkpoint(checkpoint, monkeypatch):
    _unwritable(monkeypatch, checkpoint)
    if os.name == "posix":
        checkpoint.chmod(0o555)
    yield checkpoint
    checkpoint.chmod(0o755)


def _records_warning(caplog):
    return [r for r in caplog.records if r.levelname == "WARNING" and "will not be recorded" in r.getMessage()]


def test_ppl_on_read_only_checkpoint_prints_and_skips_recording(read_only_checkpoint, wiki, capsys, caplog):
    code, out, err = run_cli(capsys, "ppl", read_only_checkpoint, "--data-path", wiki, "--seqlen", 16,
                             "--max-windows", 2, *FAST)
    assert code == 0, err
    assert "wikitext2 ppl" in out and "recorded" not in out
    assert len(_records_warning(caplog)) == 1
    assert not (read_only_checkpoint / "eval_results.json").exists()


def test_bench_on_read_only_checkpoint_prints_and_skips_recording(read_only_checkpoint, capsys, caplog):
    code, out, err = run_cli(capsys, "bench", read_only_checkpoint, "--baseline", "none", "--prompt-len", 8,
                             "--new-tokens", 2, "--repeats", 1, "--batch-size", 2, *FAST)
    assert code == 0, err
    assert "prefill" in out and "recorded" not in out
    assert len(_records_warning(caplog)) == 1
    assert not (read_only_checkpoint / "eval_results.json").exists()


def test_eval_on_read_only_checkpoint_prints_and_skips_recording(read_only_checkpoint, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    data.mkdir()
    doc = {"query": "Question: w1 w2 w3?", "choices": ["w4 w5", "w6", "w7 w8 w9"], "gold": 1}
    (data / "copa.jsonl").write_text("".join(json.dumps(doc) + "\n" for _ in range(3)))
    code, out, err = run_cli(capsys, "eval", read_only_checkpoint, "--tasks", "copa", "--data-dir", data,
                             "--limit", 2, *FAST)
    assert code == 0, err
    assert "copa" in out and "recorded" not in out
    assert len(_records_warning(caplog)) == 1
    assert not (read_only_checkpoint / "eval_results.json").exists()


def test_corrupt_results_file_warns_and_skips_recording(checkpoint, wiki, capsys, caplog):
    (checkpoint / "eval_results.json").write_text("{not json")
    code, out, err = run_cli(capsys, "ppl", checkpoint, "--data-path", wiki, "--seqlen", 16, "--max-windows", 2, *FAST)
    assert code == 0, err
    assert "wikitext2 ppl" in out and len(_records_warning(caplog)) == 1
    assert (checkpoint / "eval_results.json").read_text() == "{not json"  # left as it was


def test_baseline_of_unwritable_or_not_a_checkpoint_fails_before_work(checkpoint, wiki, tmp_path, no_work,
                                                                      monkeypatch, capsys):
    common = ["ppl", "m", "--data-path", wiki, *FAST]
    code, _, err = run_cli(capsys, *common, "--baseline-of", tmp_path)
    assert_one_error(code, err, "is not a checkpoint directory")
    _unwritable(monkeypatch, checkpoint)
    code, _, err = run_cli(capsys, *common, "--baseline-of", checkpoint)
    assert_one_error(code, err, "cannot record results there")


def test_train_gates_output_checked_before_training(tiny_model_dir, tmp_path, no_work, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "train-gates", tiny_model_dir, "-o", tmp_path / "afile" / "g", *FAST)
    assert_one_error(code, err, "is not a directory")
    _unwritable(monkeypatch, tiny_model_dir)
    code, _, err = run_cli(capsys, "train-gates", tiny_model_dir, *FAST)  # default: beside the model
    assert_one_error(code, err, "cannot write the gates to")


# ------------------------------------------------------------------------------------------- recipes

RECIPES = [
    ("method-list", b"prune:\n  - method: [wanda]\n", "prune[0].method: expected a method name, got a list"),
    ("method-mapping", b"prune:\n  - method: {a: 1}\n", "prune[0].method: expected a method name, got a mapping"),
    ("method-number", b"prune:\n  - method: 3\n", "prune[0].method: expected a method name"),
    ("not-utf8", b"\xff\xfe prune: []\n", "is not a UTF-8 text file"),
    ("latin1", "prune:\n  - method: wanda  # caf\xe9\n".encode("latin-1"), "is not a UTF-8 text file"),
    ("top-list", b"- a\n- b\n", "a recipe must be a mapping"),
    ("top-scalar", b"42\n", "a recipe must be a mapping"),
    ("empty", b"", "the file is empty"),
    ("syntax", b"prune: [\n", "invalid YAML"),
    ("syntax-indent", b"prune:\n  - method: wanda\n   sparsity: 0.5\n", "invalid YAML"),
    ("tag", b"x: !!python/object:os.system ls\n", "invalid YAML"),
    ("sparsity-list", b"prune:\n  - method: wanda\n    sparsity: [1]\n", "prune[0].sparsity: expected N:M"),
    ("sparsity-mapping", b"prune:\n  - method: wanda\n    sparsity: {a: 1}\n", "prune[0].sparsity"),
    ("sparsity-bool", b"prune:\n  - method: wanda\n    sparsity: true\n", "prune[0].sparsity"),
    ("sparsity-unquoted", b"prune:\n  - method: wanda\n    sparsity: 2:4\n", "quote N:M"),
    ("stage-scalar", b"prune:\n  - wanda\n", "prune[0]: expected a mapping"),
    ("prune-scalar", b"prune: 5\n", "prune: expected a list of stages"),
    ("calibration-scalar", b"calibration: 5\n", "calibration: expected a mapping"),
    ("nsamples-list", b"calibration:\n  nsamples: [3]\n", "nsamples must be an integer"),
    ("unknown-top", b"prnue: []\n", "prnue: unknown key"),
    ("ignore-number", b"prune:\n  - method: wanda\n    ignore: 5\n", "ignore must be a list"),
]


@pytest.mark.parametrize("name,content,needle", RECIPES, ids=[r[0] for r in RECIPES])
def test_bad_recipe_is_one_error_naming_file_and_key(name, content, needle, tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_bytes(content)
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--recipe", recipe, "-o", tmp_path / "never", *FAST)
    assert_one_error(code, err, needle)
    assert str(recipe) in err  # names the file
    assert not (tmp_path / "never").exists()


def test_recipe_that_is_a_directory(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "r.yaml").mkdir()
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "o")
    assert_one_error(code, err, "is a directory")


# ------------------------------------------------------------------------------------------- devices

DEVICES = [
    ("meta", "cannot run a model"),
    ("xyz:0", "invalid device 'xyz:0'"),
    ("hip", "cannot run a model"),
    ("ipu", "cannot run a model"),
    ("cpu:1", "the CPU has no index 1"),
    ("cuda:99", "cuda:99"),
    ("", "invalid device"),
    ("cuda:-1", "invalid device"),
]


@pytest.mark.parametrize("device,needle", DEVICES, ids=[d[0] or "empty" for d in DEVICES])
@pytest.mark.parametrize("command", ["generate", "ppl"])
def test_device_that_cannot_run_a_model(command, device, needle, checkpoint, wiki, no_work, capsys):
    extra = ["--prompt", "w1"] if command == "generate" else ["--data-path", wiki]
    code, _, err = run_cli(capsys, command, checkpoint, *extra, "--device", device, "-q")
    assert_one_error(code, err, needle)


def test_meta_device_in_compress(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--device", "meta",
                           "-o", tmp_path / "o", "-q")
    assert_one_error(code, err, "cannot run a model")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- Hub unreachable


class _Api:
    """A Hub client whose calls fail with ``exc`` (``whoami`` answers ``who``)."""

    calls: list = []

    def __init__(self, exc=None, who=None, fail=("create_repo",)):
        self.exc, self.who, self.fail = exc, who, fail

    def __call__(self, *a, **kw):  # used as the HfApi class
        return self

    def _maybe(self, name):
        _Api.calls.append(name)
        if name in self.fail and self.exc is not None:
            raise self.exc

    def whoami(self):
        self._maybe("whoami")
        return self.who or {"name": "me", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, **kw):
        self._maybe("create_repo")
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        self._maybe("upload_folder")
        return "ok"


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("stage", ["create_repo", "upload_folder"])
def test_push_hub_failure_is_one_line_and_leaves_no_card(case, stage, checkpoint, monkeypatch, capsys):
    exc, needle = _hub_errors()[case]
    monkeypatch.setattr("huggingface_hub.HfApi", _Api(exc, fail=(stage,)))
    code, _, err = run_cli(capsys, "push", checkpoint, "--repo", "me/x")
    assert_one_error(code, err, "push to me/x failed: ")
    assert ("401 Client Error" if case == 3 else needle.split(":")[0]) in err
    assert not (checkpoint / "README.md").exists()


def test_failed_push_keeps_the_previous_card(checkpoint, monkeypatch, capsys):
    import httpx2

    (checkpoint / "README.md").write_text("my own card\n")
    monkeypatch.setattr("huggingface_hub.HfApi", _Api(httpx2.ConnectError("down"), fail=("upload_folder",)))
    code, _, err = run_cli(capsys, "push", checkpoint, "--repo", "me/x")
    assert_one_error(code, err, "cannot reach the Hugging Face Hub")
    assert (checkpoint / "README.md").read_text() == "my own card\n"
    assert not [p for p in checkpoint.iterdir() if p.name.startswith(".README")]


@pytest.mark.parametrize("case", range(5))
def test_compress_push_preflight_fails_before_work(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    exc, needle = _hub_errors()[case]
    _Api.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", _Api(exc, fail=("whoami",)))
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "o",
                           "--push-to-hub", "me/x", *FAST)
    assert_one_error(code, err, "cannot push to me/x: ")
    assert needle.split(":")[0] in err
    assert not (tmp_path / "o").exists() and _Api.calls == ["whoami"]


def test_compress_push_preflight_read_only_token(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", _Api(who={"name": "me", "auth": {"accessToken": {"role": "read"}}}))
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "o",
                           "--push-to-hub", "me/x", *FAST)
    assert_one_error(code, err, "read-only")
    assert not (tmp_path / "o").exists()


def test_compress_push_failing_after_the_save_says_how_to_retry(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import httpx2

    monkeypatch.setattr("huggingface_hub.HfApi", _Api(httpx2.ConnectError("down"), fail=("create_repo",)))
    code, out, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "o",
                             "--push-to-hub", "me/x", *FAST)
    assert_one_error(code, err, "the checkpoint is saved: retry with `llmprune push")
    assert (tmp_path / "o" / "llmprune.json").is_file() and not (tmp_path / "o" / "README.md").exists()


# -------------------------------------------------------------------------------------- chat templates

TEMPLATES = [
    ("sandbox", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("syntax", "{% if %}", "TemplateSyntaxError"),
    ("raise", "{{ raise_exception('only system messages') }}", "only system messages"),
    ("undefined", "{{ messages[0].content.nope.deeper }}", "UndefinedError"),
]


@pytest.mark.parametrize("name,template,needle", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_bad_chat_template_is_one_error(name, template, needle, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = template
    tok.save_pretrained(model)
    code, _, err = run_cli(capsys, "generate", model, "--prompt", "w1", "--chat", "--max-new-tokens", 1, *FAST)
    assert_one_error(code, err, "--chat: the tokenizer's chat template failed")
    assert needle in err


# -------------------------------------------------------------------------------------------- cosmetics


def test_generate_and_bench_raise_no_past_key_values_warning(checkpoint, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(capsys, "generate", checkpoint, "--prompt", "w1 w2", "--max-new-tokens", 2, *FAST)[0] == 0
        assert run_cli(capsys, "generate", checkpoint, "--prompt", "w1 w2", "--max-new-tokens", 2, "--kv-sparsity",
                       "0.5", "--kv-window", "4", *FAST)[0] == 0
        assert run_cli(capsys, "bench", checkpoint, "--baseline", "none", "--prompt-len", 8, "--new-tokens", 2,
                       "--repeats", 1, "--batch-size", 2, "--kv-sparsity", "0.5", "--kv-window", "4", "--no-record",
                       *FAST)[0] == 0
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_lm_eval_git_hash_is_quiet_outside_a_repo(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator as evaluator

    from llmprune.evaluate.lm_eval import _quiet_git_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    original = evaluator.get_git_commit_hash
    with _quiet_git_hash():
        assert evaluator.get_git_commit_hash is not original
        evaluator.get_git_commit_hash()
    assert evaluator.get_git_commit_hash is original
    assert "fatal" not in capfd.readouterr().err


# ----------------------------------------------------------------------- flags that used to crash late

FLAGS = [
    (["train-gates", "M", "--batch-size", 0], "--batch-size must be >= 1"),
    (["train-gates", "M", "--lr", -1], "--lr must be a positive number"),
    (["train-gates", "M", "--lr", "nan"], "--lr must be a positive number"),
    (["train-gates", "M", "--block-size", 48], "--block-size must be a power of two >= 16"),
    (["train-gates", "M", "--nsamples", 0], "nsamples must be an integer >= 1"),
    (["train-gates", "M", "--seqlen", 1], "seqlen must be an integer >= 2"),
    (["eval", "M", "--tasks", "copa", "--num-fewshot", -1], "--num-fewshot must be >= 0"),
    (["ppl", "M", "--data-path", "BAD"], "is not a UTF-8 text file"),
]


@pytest.mark.parametrize("argv,needle", FLAGS, ids=[" ".join(map(str, a[:1] + a[2:])) for a, _ in FLAGS])
def test_bad_flags_fail_before_work(argv, needle, checkpoint, tmp_path, no_work, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    argv = [{"M": checkpoint, "BAD": bad}.get(a, a) for a in argv]
    code, _, err = run_cli(capsys, *argv, "-o" if argv[0] == "train-gates" else "-q",
                           *([tmp_path / "g"] if argv[0] == "train-gates" else []), *FAST)
    assert_one_error(code, err, needle)


def test_empty_prompt(checkpoint, capsys):
    code, _, err = run_cli(capsys, "generate", checkpoint, "--prompt", "w1", "--prompt", "", *FAST)
    assert_one_error(code, err, "--prompt '': no tokens")
