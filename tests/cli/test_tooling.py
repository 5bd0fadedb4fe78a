"""CLI tooling: shell completion, `llmprune env`, -q silencing library warnings, logs above progress bars."""

import json
import logging
import shutil
import subprocess
import warnings

import pytest
from helpers import run_cli, tiny_llama, tiny_tokenizer

from llmprune.calibration.data import sample_from_model
from llmprune.cli import _setup_logging


def _complete(script: str, *words: str) -> list[str]:
    """COMPREPLY of the generated bash function for the command line ``words`` (the last one being completed)."""
    line = " ".join(f"'{w}'" for w in words)
    code = f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _llmprune_complete; echo "${{COMPREPLY[@]}}"'
    out = subprocess.run(["bash", "-c", code], check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_options_and_choices(capsys):
    code, script, _ = run_cli(capsys, "completion", "bash")
    assert code == 0
    assert sorted(_complete(script, "llmprune", "co")) == ["completion", "compress", "convert"]
    assert _complete(script, "llmprune", "compress", "--dist") == ["--dist-reduce"]
    assert _complete(script, "llmprune", "compress", "--dist-reduce", "") == ["exact", "sum"]
    assert _complete(script, "llmprune", "completion", "") == ["bash", "zsh"]
    assert "--max-windows" in _complete(script, "llmprune", "ppl", "--max")  # every command's own options
    assert "--max-windows" not in _complete(script, "llmprune", "compress", "--m")


def test_zsh_completion_wraps_the_bash_function(capsys):
    code, script, _ = run_cli(capsys, "completion", "zsh")
    assert code == 0 and script.startswith("#compdef llmprune") and "bashcompinit" in script
    assert "complete -o default -o filenames -F _llmprune_complete llmprune" in script


def test_completion_rejects_other_shells(capsys):
    code, _, err = run_cli(capsys, "completion", "fish")
    assert code == 2 and "invalid choice" in err


def test_env_reports_versions_as_text_and_json(capsys):
    code, out, err = run_cli(capsys, "env", "--json")
    assert code == 0
    report = json.loads(out)
    import torch
    import transformers

    assert report["packages"]["torch"] == torch.__version__.split("+")[0] or \
        report["packages"]["torch"] == torch.__version__
    assert report["packages"]["transformers"] == transformers.__version__
    assert report["accelerator"]["cuda_available"] == torch.cuda.is_available()
    assert f"- transformers: {transformers.__version__}" in err  # the text went to stderr
    code, out, _ = run_cli(capsys, "env")
    assert code == 0 and out.startswith("- llmprune: ") and "- python: " in out


@pytest.fixture
def _restore_levels():
    from llmprune.cli import _THIRD_PARTY_LOGGERS

    levels = {name: logging.getLogger(name).level for name in (*_THIRD_PARTY_LOGGERS, "llmprune")}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_silences_library_warnings(_restore_levels):
    with warnings.catch_warnings(record=True) as seen:  # the filters set by -q are undone when this block ends
        warnings.simplefilter("always")
        _setup_logging(quiet=True)
        warnings.warn("from a library", FutureWarning, stacklevel=1)
        assert seen == []
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("llmprune").getEffectiveLevel() <= logging.WARNING  # our own warnings stay


def test_self_sampling_shows_a_progress_bar_over_tokens(capsys):
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = sample_from_model(model, tok, nsamples=3, seqlen=5, seed=0, batch_size=2, progress=True)
    assert ids.shape == (3, 5)
    err = capsys.readouterr().err
    assert "sampling from the model" in err and "100%" in err and "12.0/12.0" in err  # 3 sequences x 4 new tokens
    again = sample_from_model(model, tok, nsamples=3, seqlen=5, seed=0, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    assert (again == ids).all()  # the bar does not change what is sampled


def test_log_lines_go_through_tqdm_only_when_the_root_logger_prints_to_the_console():
    import sys

    from llmprune.cli import _logs_above_bars

    root = logging.getLogger()
    before = list(root.handlers)
    with _logs_above_bars():  # pytest's capture handlers only: a host's logging is left alone
        assert root.handlers == before
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        with _logs_above_bars():
            assert console not in root.handlers
            assert any(type(h).__name__ == "_TqdmLoggingHandler" for h in root.handlers)
        assert console in root.handlers  # restored afterwards
    finally:
        root.removeHandler(console)
