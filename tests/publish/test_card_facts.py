"""Model card facts (issue 19, bug 6), built with huggingface_hub's ModelCard, offline via ``llmprune card``;
``push --revision/--create-pr/--token``."""

from __future__ import annotations

from helpers import run_cli, tiny_llama

import llmprune
from llmprune.config import CalibConfig, Recipe
from llmprune.evaluate.results import record_results
from llmprune.prune.methods.cfsp import CFSPConfig
from llmprune.publish.modelcard import build_card


def _load(text: str, tmp_path):
    from huggingface_hub import ModelCard

    (tmp_path / "card.md").write_text(text)
    return ModelCard.load(tmp_path / "card.md")


def test_card_metadata_and_offline_command(checkpoint, tmp_path, capsys):
    record_results(checkpoint, "lm_eval", {"arc_easy": {"task": "arc_easy", "metrics": {"acc_norm": 0.38},
                                                        "main_metric": "acc_norm", "limit": 100, "n_samples": 100}})
    record_results(checkpoint, "lm_eval", {"arc_easy": {"task": "arc_easy", "metrics": {"acc_norm": 0.40},
                                                        "limit": 100}}, baseline=True)
    code, out, err = run_cli(capsys, "card", checkpoint, "--print")
    assert code == 0, err and not (checkpoint / "README.md").exists()
    card = _load(out, tmp_path)
    data = card.data.to_dict()
    n = sum(p.numel() for p in llmprune.load(checkpoint).parameters())
    assert data["parameters"] == n and data["dtype"] == "float32"
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.38  # model-index via EvalResult
    assert "| 95.0% |" in out  # accuracy recovery next to the baseline
    assert f"{n:,} parameters" in out
    code, out, err = run_cli(capsys, "card", checkpoint)
    assert code == 0, err
    assert (checkpoint / "README.md").is_file() and (checkpoint / "recipe.yaml").is_file()
    from llmprune.recipe import load_recipe

    assert load_recipe(checkpoint / "recipe.yaml").stages[0].sparsity.is_nm  # usable with --recipe


def test_converted_checkpoint_card_shows_the_convert(checkpoint, tmp_path, capsys):
    assert run_cli(capsys, "convert", checkpoint, "--format", "packed", "-o", tmp_path / "p")[0] == 0
    card = build_card(tmp_path / "p")
    assert "Converted from the `dense` format" in card and "llmprune convert" in card
    assert "format: packed" in card and "format: dense" not in card  # the recipe as the files now are
    assert _load(card, tmp_path).data.library_name == "llmprune"


def test_cfsp_card_says_removed(tiny_model_dir, tiny_calib_file, tmp_path):
    tiny_llama(num_hidden_layers=2).save_pretrained(tiny_model_dir)
    recipe = Recipe(stages=[CFSPConfig(sparsity=0.25, allocation="uniform")],
                    calibration=CalibConfig(source=str(tiny_calib_file), nsamples=2, seqlen=16, batch_size=2))
    res = llmprune.compress(str(tiny_model_dir), recipe, tmp_path / "c", device="cpu", progress=False)
    card = build_card(res.output)
    data = _load(card, tmp_path).data
    assert "structured-sparsity" in data.tags and "unstructured-sparsity" not in data.tags
    assert "removed" in card and "are zero" not in card
    assert data.parameters == sum(p.numel() for p in llmprune.load(res.output).parameters()) < \
        sum(p.numel() for p in tiny_llama().parameters())


class _Api:
    calls: list = []

    def __init__(self, token=None):
        _Api.calls.append(("init", {"token": token}))

    def create_repo(self, **kw):
        _Api.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_branch(self, **kw):
        _Api.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        _Api.calls.append(("upload_folder", kw))

        class Commit:
            pr_url = "https://huggingface.co/me/x/discussions/1"
        return Commit()


def test_push_revision_create_pr_token(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", _Api)
    _Api.calls = []
    code, out, err = run_cli(capsys, "push", checkpoint, "--repo", "me/x", "--revision", "v2", "--token", "hf_x")
    assert code == 0, err
    names = [c[0] for c in _Api.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert _Api.calls[0][1] == {"token": "hf_x"} and _Api.calls[3][1]["revision"] == "v2"
    assert "hf_x" not in out + err
    _Api.calls = []
    code, out, err = run_cli(capsys, "push", checkpoint, "--repo", "me/x", "--create-pr")
    assert code == 0, err
    assert _Api.calls[-1][1]["create_pr"] is True and "discussions/1" in out


def test_failed_push_writes_nothing(checkpoint, monkeypatch, capsys):
    class Down(_Api):
        def upload_folder(self, **kw):
            raise OSError("network down")

    monkeypatch.setattr("huggingface_hub.HfApi", Down)
    before = sorted(p.name for p in checkpoint.iterdir())
    code, _, err = run_cli(capsys, "push", checkpoint, "--repo", "me/x")
    assert code == 2 and "push to me/x failed" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # no README.md, no recipe.yaml
