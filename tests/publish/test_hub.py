"""Model card content and the Hub upload call sequence (huggingface_hub mocked: no network)."""

import json

import pytest
import yaml
from helpers import run_cli

from llmprune.evaluate.results import record_results
from llmprune.publish import hub
from llmprune.publish.modelcard import build_card
from llmprune.publish.paths import hub_base_model, public_text

SECRET = "hf_THIS_IS_A_FAKE_TOKEN_0123456789"


class FakeApi:
    """Records calls in order; checks the card is on disk when the folder is uploaded."""

    def __init__(self, *a, **kw):
        self.calls = []
        FakeApi.last = self

    def whoami(self):
        self.calls.append(("whoami", {}))
        return {"name": "me", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        from pathlib import Path

        folder = Path(kw["folder_path"])
        card = folder / "README.md"
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", {**kw, "card": card.read_text() if card.is_file() else None,
                                             "files": files}))
        return "commit-url"


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_metadata_recipe_command_and_numbers(checkpoint):
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    record_results(checkpoint, "ppl", {"wikitext2[seqlen=64,windows=2]": {"dataset": "wikitext2", "ppl": 31.25,
                                                                           "seqlen": 64, "windows": 2}})
    record_results(checkpoint, "ppl", {"wikitext2[seqlen=64,windows=2]": {"dataset": "wikitext2", "ppl": 20.5,
                                                                           "seqlen": 64, "windows": 2}}, baseline=True)
    record_results(checkpoint, "lm_eval", {"arc_easy": {"task": "arc_easy", "metrics": {"acc": 0.41, "acc_norm": 0.38},
                                                        "main_metric": "acc_norm", "limit": 100, "n_samples": 100}})
    record_results(checkpoint, "lm_eval", {"arc_easy": {"task": "arc_easy", "metrics": {"acc": 0.5, "acc_norm": 0.46},
                                                        "limit": 100, "n_samples": 100}}, baseline=True)
    record_results(checkpoint, "bench", {"device": "CPU (2 threads)", "cpu": True, "prompt_len": 16, "new_tokens": 4,
                                         "rows": [{"label": "model", "features": ["dense"], "batch": 1,
                                                   "checkpoint_bytes": 2**20, "peak_mem_bytes": 2**21,
                                                   "prefill_tok_s": 100.0, "decode_tok_s": 10.0}]})
    card = build_card(checkpoint, repo_id="me/tiny-2of4")
    front = _front_matter(card)
    assert front["library_name"] == "transformers"  # dense format: plain transformers loads it
    assert "base_model" not in front  # a local random model has no Hub id
    for tag in ("llmprune", "pruned", "sparsity", "2:4", "magnitude"):
        assert tag in front["tags"]
    assert "# me/tiny-2of4" in card
    assert public_text(meta["command"], checkpoint) in card  # the reproduction command, without local paths
    assert "method: magnitude" in card and "sparsity: '2:4'" in card  # the recipe
    assert "No calibration data" in card  # magnitude is data-free
    assert "| wikitext2 | 2 × 64-token windows | 31.250 | 20.500 | +10.750 |" in card
    assert "| arc_easy | acc_norm | 100 | 0.3800 | 0.4600 | -0.0800 |" in card
    assert "torch reference paths" in card and "| 100.0 | 10.0 |" in card
    assert "AutoModelForCausalLM.from_pretrained('me/tiny-2of4')" in card


def test_card_calibration_and_hub_base(checkpoint):
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    meta["base_model"] = "smollm2-135m"
    meta["calibration"] = {"source": "c4", "nsamples": 64, "seqlen": 512, "seed": 0}
    meta["format"] = "packed"
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))
    card = build_card(checkpoint)
    front = _front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "llmprune" and "packed-format" in front["tags"]
    assert "64 sequences × 512 tokens from `c4`" in card and "seed 0" in card
    assert "llmprune.load(" in card and "Not measured yet" in card
    assert hub_base_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_base_model("/nonexistent/dir") is None


def test_card_recorded_runtime_uses_the_real_flags(checkpoint):
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    meta["recipe"]["runtime"] = {"kv_k_sparsity": 0.5, "kv_window": 16}
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))
    card = build_card(checkpoint)
    assert "`--k-sparsity 0.5`, `--kv-window 16`" in card and "`llmprune generate`, `ppl`, `eval` and `bench`" in card
    assert "runtime-kv-k-sparsity" in _front_matter(card)["tags"]


def test_push_call_sequence(checkpoint, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    caplog.set_level("DEBUG")
    code, out, err = run_cli(capsys, "push", checkpoint, "--repo", "me/tiny-2of4", "--private")
    assert code == 0, err
    calls = FakeApi.last.calls
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/tiny-2of4", "repo_type": "model", "private": True, "exist_ok": True}
    up = calls[1][1]
    assert up["repo_id"] == "me/tiny-2of4"
    # A staging folder with every file of the checkpoint (the same bytes) plus the generated card.
    local = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file() and p.name != "README.md"}
    assert set(up["files"]) == set(local) | {"README.md", "recipe.yaml"}
    assert all(up["files"][n] == b for n, b in local.items() if n not in hub.PUBLIC_JSON)
    assert up["card"] is not None and "library_name: transformers" in up["card"]  # card generated before upload
    assert (checkpoint / "README.md").read_text() == up["card"]  # and kept with the checkpoint after the upload
    assert "https://huggingface.co/me/tiny-2of4" in out
    assert SECRET not in out + err + caplog.text


def test_compress_push_to_hub(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    code, out, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                             "--device", "cpu", "-o", tmp_path / "p", "--push-to-hub", "me/p", "-q")
    assert code == 0, err
    calls = FakeApi.last.calls
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["private"] is False and "unstructured-sparsity" in calls[1][1]["card"]
    assert (tmp_path / "p" / "README.md").is_file()


def test_bad_repo_id_fails_before_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--method", "magnitude", "-o", tmp_path / "x",
                           "--push-to-hub", "not a repo", "-q")
    assert code == 2 and "invalid Hub repo id" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, "push", tmp_path, "--repo", "me/x")
    assert code == 2 and "not a model directory" in err


def test_push_http_error_is_one_line(checkpoint):
    from huggingface_hub.errors import HfHubHTTPError

    class Denied(FakeApi):
        def create_repo(self, **kw):
            err = HfHubHTTPError.__new__(HfHubHTTPError)
            Exception.__init__(err, "403 Forbidden: you cannot create a repo here\nmore details")
            raise err

    with pytest.raises(hub.LlmpruneError, match="push to org/x failed: 403 Forbidden"):
        hub.push(checkpoint, "org/x", api=Denied())
