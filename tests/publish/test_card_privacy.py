"""The model card and the JSON files pushed name no local path (user name, directory layout, absolute
command lines), whichever way ``llmprune.json`` records paths; the card claims a dense baseline "evaluated with
the same protocol" only when one was measured."""

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from llmprune.evaluate.results import record_results
from llmprune.publish import hub
from llmprune.publish.modelcard import build_card
from llmprune.publish.paths import public_text

SAME_PROTOCOL = "evaluated with the same protocol and settings"
# A path token: starts after a separator with "/" or "~/" (URLs have "://" and are not matched).
_PATH_TOKEN = re.compile(r"(?:^|[\s'\"=(`\[,])(?:/|~/)[\w.-]", re.M)


def assert_no_local_paths(text: str, tmp_path: Path) -> None:
    assert str(tmp_path) not in text
    assert "pytest-of-" not in text  # the user name in pytest's temp root
    home = str(Path.home())
    if home not in ("/", ""):
        assert home not in text
    found = _PATH_TOKEN.search(text)
    assert found is None, f"local path in: ...{text[max(0, found.start() - 60):found.end() + 60]}..."
    assert "../../" not in text  # no climbing relative path that spells out the layout


class Api:
    """Records the staged upload (file name -> text for llmprune's own files and the card)."""

    uploads: list = []

    def __init__(self, *a, **kw):
        pass

    def whoami(self):
        return {"name": "me"}

    def create_repo(self, **kw):
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        Api.uploads.append({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
        return "ok"


def _absolute_meta(checkpoint: Path, tmp_path: Path) -> dict:
    """Rewrite llmprune.json the way older versions recorded it: absolute paths everywhere."""
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    base = tmp_path / "tiny-llama"
    meta.pop("paths", None)
    meta["base_model"] = str(base)
    meta["command"] = (f"llmprune compress {base} --method wanda --calib '{tmp_path}/my data/c.txt' "
                       f"--recipe={tmp_path}/r.yaml -o {checkpoint} --offload-dir ~/scratch/off")
    meta["recipe"]["calibration"]["source"] = str(tmp_path / "my data" / "c.txt")
    meta["recipe"]["runtime"] = {"gates": str(tmp_path / "gates")}
    meta["calibration"] = {"source": str(tmp_path / "my data" / "c.txt"), "nsamples": 4, "seqlen": 32, "seed": 0}
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))
    return meta


def _results_with_paths(checkpoint: Path, tmp_path: Path) -> None:
    entry = {"dataset": "wikitext2", "ppl": 30.0, "seqlen": 64, "windows": 2,
             "data_path": str(tmp_path / "wiki.test.raw.txt"), "model": str(checkpoint)}
    record_results(checkpoint, "ppl", {"wikitext2[seqlen=64,windows=2]": entry})
    record_results(checkpoint, "ppl", {"wikitext2[seqlen=64,windows=2]": {**entry, "ppl": 20.0,
                                                                         "model": str(tmp_path / "tiny-llama")}},
                   baseline=True)
    record_results(checkpoint, "lm_eval", {f"arc_easy[gates={tmp_path}/gates]": {
        "task": "arc_easy", "metrics": {"acc_norm": 0.3}, "limit": 10, "model": str(checkpoint),
        "runtime": {"gates": str(tmp_path / "gates")}}})
    record_results(checkpoint, "bench", {"device": "cpu", "rows": [
        {"label": "model", "model": str(checkpoint), "batch": 1, "prefill_tok_s": 1.0, "decode_tok_s": 1.0},
        {"label": "baseline", "model": str(tmp_path / "tiny-llama"), "batch": 1, "prefill_tok_s": 1.0,
         "decode_tok_s": 1.0}]})


def test_card_of_a_fresh_checkpoint_has_no_local_paths(checkpoint, tmp_path):
    card = build_card(checkpoint, repo_id="me/tiny")
    assert_no_local_paths(card, tmp_path)
    assert "tiny-llama" in card  # the base model is still named


def test_card_with_absolute_metadata_and_results(checkpoint, tmp_path):
    _absolute_meta(checkpoint, tmp_path)
    _results_with_paths(checkpoint, tmp_path)
    card = build_card(checkpoint)
    assert_no_local_paths(card, tmp_path)
    assert "llmprune compress tiny-llama --method wanda --calib 'my data/c.txt' --recipe=r.yaml -o ckpt" in card
    assert "--offload-dir off" in card and "`my data/c.txt`" in card


def test_card_with_relative_metadata(checkpoint, tmp_path):
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    meta.update(paths="relative", base_model="../tiny-llama",
                command="llmprune compress ../tiny-llama -o . --calib ../../../../home/someone/c.txt")
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))
    card = build_card(checkpoint)
    assert_no_local_paths(card, tmp_path)
    assert "someone" not in card and "llmprune compress ../tiny-llama -o . --calib c.txt" in card


def test_base_model_hub_id_recorded_by_a_local_folder(checkpoint, tmp_path):
    base = tmp_path / "local-copy"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "org/real-model"}))
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    meta["base_model"] = str(base)
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))
    card = build_card(checkpoint)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "org/real-model" and "`org/real-model` pruned with" in card
    assert_no_local_paths(card, tmp_path)


def test_pushed_files_have_no_local_paths(checkpoint, tmp_path, monkeypatch, capsys):
    _absolute_meta(checkpoint, tmp_path)
    _results_with_paths(checkpoint, tmp_path)
    (checkpoint / "attn_gates.json").write_text(json.dumps({"base_model": str(tmp_path / "tiny-llama"),
                                                            "command": f"llmprune train-gates {tmp_path}/tiny-llama"}))
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    Api.uploads = []
    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    code, _, err = run_cli(capsys, "push", checkpoint, "--repo", "me/tiny")
    assert code == 0, err
    (files,) = Api.uploads
    for name in (*hub.PUBLIC_JSON, "README.md"):
        text = files[name].decode()
        assert_no_local_paths(text, tmp_path)
        if name.endswith(".json"):
            json.loads(text)
    assert json.loads(files["llmprune.json"])["base_model"] == "tiny-llama"
    # The checkpoint's own files are left as they were (only the card is added after the upload).
    after = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    assert set(after) == set(before) | {"README.md", "recipe.yaml"} and all(after[n] == b for n, b in before.items())


# ------------------------------------------------------------------------------------ baseline sentence


def _ppl(ckpt, ppl, *, baseline=False, seqlen=64):
    key = f"wikitext2[seqlen={seqlen},windows=2]"
    record_results(ckpt, "ppl", {key: {"dataset": "wikitext2", "ppl": ppl, "seqlen": seqlen, "windows": 2}},
                   baseline=baseline)


def _task(ckpt, task, acc, *, baseline=False):
    record_results(ckpt, "lm_eval", {task: {"task": task, "metrics": {"acc_norm": acc}, "limit": 10}}, baseline=baseline)


def _bench(ckpt, labels):
    record_results(ckpt, "bench", {"device": "cpu", "rows": [
        {"label": lab, "batch": 1, "prefill_tok_s": 1.0, "decode_tok_s": 1.0} for lab in labels]})


BASELINE_CASES = [
    ("nothing measured", [], None),
    ("ppl, no baseline", [lambda c: _ppl(c, 30.0)], None),
    ("ppl + baseline", [lambda c: _ppl(c, 30.0), lambda c: _ppl(c, 20.0, baseline=True)], "perplexity"),
    ("baseline of another protocol", [lambda c: _ppl(c, 30.0), lambda c: _ppl(c, 20.0, baseline=True, seqlen=128)],
     None),
    ("lm-eval, no baseline", [lambda c: _task(c, "arc_easy", 0.3)], None),
    ("lm-eval baseline of another task", [lambda c: _task(c, "arc_easy", 0.3),
                                          lambda c: _task(c, "piqa", 0.6, baseline=True)], None),
    ("lm-eval + baseline", [lambda c: _task(c, "arc_easy", 0.3), lambda c: _task(c, "arc_easy", 0.4, baseline=True)],
     "lm-eval"),
    ("bench without baseline rows", [lambda c: _bench(c, ["model"])], None),
    ("bench with baseline rows", [lambda c: _bench(c, ["model", "baseline"])], "bench"),
    ("ppl baseline only, lm-eval without", [lambda c: _ppl(c, 30.0), lambda c: _ppl(c, 20.0, baseline=True),
                                            lambda c: _task(c, "arc_easy", 0.3)], "perplexity"),
]


@pytest.mark.parametrize("name,steps,measured", BASELINE_CASES, ids=[c[0] for c in BASELINE_CASES])
def test_baseline_sentence_only_when_measured(name, steps, measured, checkpoint):
    for step in steps:
        step(checkpoint)
    card = build_card(checkpoint)
    if measured is None:
        assert SAME_PROTOCOL not in card
        assert ("Not measured yet" in card) if not steps else ("No dense baseline was measured" in card)
    else:
        (line,) = [ln for ln in card.splitlines() if SAME_PROTOCOL in ln]
        assert line.startswith(f"Dense baseline ({measured})")


# ------------------------------------------------------------------------------------------ public_text


@pytest.mark.parametrize("text,expected", [
    ("https://huggingface.co/org/model", "https://huggingface.co/org/model"),
    ("org/model", "org/model"),
    ("2/4 and N/A", "2/4 and N/A"),
    ("recipes/wanda-50.yaml", "recipes/wanda-50.yaml"),
    ("../sibling", "../sibling"),
    ("/elsewhere/deep/model-dir", "model-dir"),
    ("--calib=/elsewhere/c.txt", "--calib=c.txt"),
    ("'/elsewhere/with space/x y'", "'x y'"),
    ("~/models/llama", "llama"),
    ("a / b", "a / b"),
])
def test_public_text(text, expected, tmp_path):
    assert public_text(text, tmp_path / "ckpt") == expected


def test_public_text_under_the_checkpoint_parent(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert public_text(f"-o {ckpt} --gates {ckpt}/g {tmp_path}/base", ckpt) == "-o ckpt --gates ckpt/g base"
