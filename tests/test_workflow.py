"""The Python API covers what the CLI does: compress (model in memory or path), save, perplexity, evaluate, bench,
convert, push."""

import json

import pytest
import torch
from helpers import TINY_VOCAB, tiny_llama, tiny_text, tiny_tokenizer

import llmprune
from llmprune.errors import ConfigError
from llmprune.evaluate.perplexity import perplexity as core_perplexity

IDS = torch.randint(3, TINY_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def _is_24(w: torch.Tensor) -> bool:
    return bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def test_compress_a_model_in_memory_with_token_ids_and_save(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    res = llmprune.compress(model, llmprune.WandaConfig(sparsity="2:4"), tmp_path / "out", calib=IDS,
                            tokenizer=tok, device="cpu", progress=False)
    assert res.output == tmp_path / "out" and res.report.overall_sparsity == pytest.approx(0.5)
    assert _is_24(model.model.layers[0].mlp.up_proj.weight)  # pruned in place
    meta = json.loads((res.output / "llmprune.json").read_text())
    assert meta["recipe"]["prune"][0]["method"] == "wanda" and meta["sparsity"]["overall"] == pytest.approx(0.5)
    assert meta == res.metadata
    loaded = llmprune.load(res.output)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)
    assert (res.output / "tokenizer.json").is_file() or (res.output / "tokenizer_config.json").is_file()


def test_compress_a_model_in_memory_from_a_text_file_without_saving(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(3000))
    recipe = llmprune.Recipe(stages=[llmprune.SparseGPTConfig(sparsity=0.5)],
                             calibration=llmprune.CalibConfig(nsamples=4, seqlen=32))
    res = llmprune.compress(tiny_llama(), recipe, calib=str(calib), tokenizer=tiny_tokenizer(), device="cpu",
                            progress=False)
    assert res.output is None and res.metadata == {}
    assert res.report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_compress_checks_its_arguments(tmp_path):
    with pytest.raises(ConfigError, match="recipe is required"):
        llmprune.compress(tiny_llama(), None)
    with pytest.raises(ConfigError, match="output is required"):
        llmprune.compress("smollm2-135m", llmprune.MagnitudeConfig(sparsity=0.5))
    with pytest.raises(ConfigError, match="need a model in memory"):
        llmprune.compress("smollm2-135m", llmprune.WandaConfig(sparsity=0.5), tmp_path / "o", calib=IDS)
    with pytest.raises(ConfigError, match="low_memory: only for a model reference"):
        llmprune.compress(tiny_llama(), llmprune.MagnitudeConfig(sparsity=0.5), low_memory=True)


def test_compress_a_path_goes_through_the_checkpoint_pipeline(tiny_model_dir, tmp_path):
    res = llmprune.compress(str(tiny_model_dir), [llmprune.MagnitudeConfig(sparsity="2:4")], tmp_path / "p",
                            device="cpu", progress=False)
    saved = json.loads((tmp_path / "p" / "llmprune.json").read_text())
    assert saved["base_model"] == res.metadata["base_model"] == "../tiny-llama"  # relative to the checkpoint
    assert saved["sparsity"] == res.metadata["sparsity"]


def test_save_a_model_pruned_in_memory_measures_the_sparsity(tmp_path):
    model = tiny_llama()
    report = llmprune.prune(model, llmprune.MagnitudeConfig(sparsity="2:4"), progress=False)
    path = llmprune.save(model, tmp_path / "s", tiny_tokenizer(), recipe=llmprune.MagnitudeConfig(sparsity="2:4"))
    meta = json.loads((path / "llmprune.json").read_text())
    assert meta["sparsity"]["overall"] == pytest.approx(report.overall_sparsity)  # measured from the weights
    assert set(meta["sparsity"]["modules"]) == {m.name for m in report.modules}
    assert meta["recipe"]["prune"][0]["method"] == "magnitude"
    with pytest.raises(Exception, match="exists"):  # never over an existing directory unless overwrite
        llmprune.save(model, path, recipe=llmprune.MagnitudeConfig(sparsity="2:4"))
    assert llmprune.save(model, path, recipe=llmprune.MagnitudeConfig(sparsity="2:4"), overwrite=True) == path


def test_perplexity_from_a_tokenizer_and_a_data_file_matches_token_ids(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    text_file = tmp_path / "wiki.test.raw.txt"
    text_file.write_text("\n".join(tiny_text(200, seed=i) for i in range(4)))
    res = llmprune.perplexity(model, tok, seqlen=64, data_path=text_file, progress=False)
    joined = "\n\n".join(ln for ln in text_file.read_text().split("\n") if ln.strip())
    ref = core_perplexity(model, tok(joined, return_tensors="pt").input_ids, 64, progress=False)
    assert res.ppl == ref.ppl and res.windows == ref.windows > 1
    old = llmprune.perplexity(model, tok(joined, return_tensors="pt").input_ids, seqlen=64, progress=False)
    assert old.ppl == ref.ppl  # the token-ids form keeps working


def test_evaluate_is_the_stage_package_and_callable(monkeypatch):
    import llmprune.evaluate.lm_eval as lm_eval

    seen = {}
    monkeypatch.setattr(lm_eval, "evaluate", lambda m, t, tasks, **kw: seen.update(tasks=tasks, **kw) or {"ok": 1})
    import llmprune.workflow as wf

    monkeypatch.setattr(wf, "_lm_eval", lm_eval.evaluate)
    model, tok = tiny_llama(), tiny_tokenizer()
    assert llmprune.evaluate(model, tok, tasks=["arc_easy"], limit=2) == {"ok": 1}
    assert seen == {"tasks": ["arc_easy"], "limit": 2}
    assert llmprune.evaluate.perplexity.perplexity is core_perplexity  # still the package
    with pytest.raises(ConfigError, match="tasks is required"):
        llmprune.evaluate(model, tok)


def test_convert_and_bench_from_python(checkpoint, tmp_path):
    packed = llmprune.convert(checkpoint, "packed", tmp_path / "packed")
    assert json.loads((packed / "llmprune.json").read_text())["format"] == "packed"
    torch.testing.assert_close(llmprune.load(packed)(IDS).logits, llmprune.load(checkpoint)(IDS).logits)
    result = llmprune.bench(str(packed), None, prompt_len=8, new_tokens=2, repeats=1, device="cpu")
    assert [row["batch"] for row in result["rows"]] == [1] and result["new_tokens"] == 2


def test_push_from_python_with_an_api_object(checkpoint):
    class Api:
        def __init__(self):
            self.calls = []

        def whoami(self, *a, **kw):
            return {"name": "me", "auth": {"accessToken": {"role": "write"}}}

        def create_repo(self, **kw):
            self.calls.append("create_repo")
            return f"https://huggingface.co/{kw['repo_id']}"

        def upload_folder(self, **kw):
            self.calls.append("upload_folder")
            return "commit-url"

    api = Api()
    url = llmprune.push(checkpoint, "me/tiny-2of4", api=api)
    assert "me/tiny-2of4" in url and api.calls == ["create_repo", "upload_folder"]


def test_save_records_the_alias_of_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_llama()
    model.config._name_or_path = str(tmp_path / "cache" / "models" / "smollm2-135m-instruct-bf16")
    path = llmprune.save(model, tmp_path / "a", recipe=llmprune.MagnitudeConfig(sparsity=0.5))
    assert json.loads((path / "llmprune.json").read_text())["base_model"] == "smollm2-135m"
    model.config._name_or_path = "org/some-model"  # a Hub id is recorded as it is
    path = llmprune.save(model, tmp_path / "b", recipe=llmprune.MagnitudeConfig(sparsity=0.5))
    assert json.loads((path / "llmprune.json").read_text())["base_model"] == "org/some-model"
