"""lm-eval integration: offline task YAMLs, `llmprune eval` on a tiny model, results stored with the checkpoint."""

import json

import pytest
import yaml
from helpers import SHARED, needs_shared, run_cli, tiny_text

from llmprune.evaluate import lm_eval as evaluation
from llmprune.evaluate import task_files
from llmprune.evaluate.lm_eval import evaluate, metrics_by_task
from llmprune.evaluate.task_files import OFFLINE_TASKS, write_task_dir
from llmprune.formats.metadata import resolve_base_model

LM_EVAL_DATA = SHARED / "data" / "lm_eval"

MC = {"query": "Question: w1 w2 w3?", "choices": ["w4 w5", "w6", "w7 w8 w9"], "gold": 1}
SAMPLES = {
    **{t: MC for t in ("arc_easy", "arc_challenge", "piqa", "hellaswag", "copa")},
    "boolq": {"query": "Passage: w1 w2\nQuestion: w3?", "choices": ["no", "yes"], "gold": 0},
    "winogrande": {"context_options": ["w1 w2 w3", "w1 w2 w4"], "continuation": "w5 w6.", "gold": 0},
    "lambada_openai": {"context": "w1 w2 w3 w4", "continuation": "w5"},
}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for task, doc in SAMPLES.items():
        (d / f"{task}.jsonl").write_text("".join(json.dumps(doc) + "\n" for _ in range(3)))
    return d


def test_task_templates_ship_every_task():
    for task in OFFLINE_TASKS:
        cfg = yaml.safe_load((task_files.TASKS_DIR / f"{task}.yaml").read_text())
        assert cfg["task"] == task and cfg["dataset_path"] == "json"
        assert all("@DATA_DIR@" in v for v in cfg["dataset_kwargs"]["data_files"].values())


def test_write_task_dir_and_task_manager(data_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    out, written = write_task_dir(data_dir, tmp_path / "inc")
    assert sorted(written) == sorted(OFFLINE_TASKS)
    cfg = yaml.safe_load((out / "boolq.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": str(data_dir.resolve() / "boolq.jsonl")}
    manager = TaskManager(include_path=str(out), include_defaults=False)
    assert set(OFFLINE_TASKS) == set(manager.all_tasks)
    # a directory with only some files: only those tasks
    (data_dir / "piqa.jsonl").unlink()
    _, written = write_task_dir(data_dir, tmp_path / "inc2")
    assert "piqa" not in written and "arc_easy" in written


def test_evaluate_all_offline_tasks_metric_names(data_dir, monkeypatch):
    """Every shipped task runs on a loaded model and reports lm-eval's standard metric names."""
    from helpers import tiny_llama, tiny_tokenizer

    monkeypatch.delenv(task_files.DATA_ENV, raising=False)
    res = evaluate(tiny_llama(), tiny_tokenizer(), list(OFFLINE_TASKS), limit=2, batch_size=4, data_dir=data_dir)
    metrics = metrics_by_task(res)
    assert set(metrics) == set(OFFLINE_TASKS)
    for task in ("arc_easy", "arc_challenge", "piqa", "hellaswag"):
        assert {"acc", "acc_norm"} <= set(metrics[task]), task
    for task in ("boolq", "copa", "winogrande"):
        assert "acc" in metrics[task] and "acc_norm" not in metrics[task], task
    assert {"acc", "perplexity"} <= set(metrics["lambada_openai"])
    assert all(0.0 <= metrics[t]["acc"] <= 1.0 for t in OFFLINE_TASKS)
    assert res["llmprune"]["offline_tasks"] == list(OFFLINE_TASKS)
    # the prompt is lm-eval's: boolq drops our "Passage: " prefix and ends with "\nAnswer:"
    assert res["configs"]["boolq"]["doc_to_text"].endswith("}}\nAnswer:")
    json.dumps(res)  # serializable


@needs_shared(LM_EVAL_DATA / "arc_easy.jsonl")
def test_eval_cli_arc_easy_records_with_checkpoint(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "res.json"
    code, out, err = run_cli(capsys, "eval", checkpoint, "--tasks", "arc_easy", "--limit", 4, "--batch-size", 4,
                             "--data-dir", LM_EVAL_DATA, "--device", "cpu", "--output", out_json, "--baseline", "-q")
    assert code == 0, err
    assert "arc_easy" in out and "acc_norm" in out and "baseline" in out
    full = json.loads(out_json.read_text())
    assert full["model"]["results"]["arc_easy"]["acc,none"] >= 0.0
    assert full["model"]["n-samples"]["arc_easy"]["effective"] == 4
    stored = json.loads((checkpoint / "eval_results.json").read_text())
    entry = stored["lm_eval"]["arc_easy"]
    assert entry["limit"] == 4 and entry["n_samples"] == 4 and entry["offline_data"] is True
    assert set(entry["metrics"]) >= {"acc", "acc_norm", "acc_stderr"}
    # base_model is recorded relative to the checkpoint; --baseline resolves it against the checkpoint directory
    assert stored["baseline"]["lm_eval"]["arc_easy"]["model"] == resolve_base_model(
        checkpoint, json.loads((checkpoint / "llmprune.json").read_text()))


def test_eval_data_dir_from_env(data_dir, checkpoint, monkeypatch, capsys):
    monkeypatch.setenv(task_files.DATA_ENV, str(data_dir))
    code, out, err = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--limit", 2, "--device", "cpu", "-q")
    assert code == 0, err
    assert json.loads((checkpoint / "eval_results.json").read_text())["lm_eval"]["copa"]["n_samples"] == 2


def test_task_manager_indexes_builtins_only_when_needed():
    calls = []

    class FakeManager:
        def __init__(self, include_path=None, include_defaults=True):
            calls.append((include_path, include_defaults))
            self.all_tasks = ["arc_easy"] + (["mmlu"] if include_defaults else [])

    assert "mmlu" not in evaluation._task_manager(FakeManager, ["/inc"], ["arc_easy"]).all_tasks
    assert calls == [(["/inc"], False)]
    assert "mmlu" in evaluation._task_manager(FakeManager, ["/inc"], ["arc_easy", "mmlu"]).all_tasks
    assert calls[-1] == (["/inc"], True)
    evaluation._task_manager(FakeManager, [], ["mmlu"])
    assert calls[-1] == (None, True)


def test_include_path_user_task(data_dir, checkpoint, tmp_path, capsys):
    inc = tmp_path / "mine"
    inc.mkdir()
    cfg = yaml.safe_load((task_files.TASKS_DIR / "copa.yaml").read_text())
    cfg["task"] = "my_copa"
    cfg["dataset_kwargs"]["data_files"] = {"validation": str(data_dir / "copa.jsonl")}
    (inc / "my_copa.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(capsys, "eval", checkpoint, "--tasks", "my_copa", "--include-path", inc, "--limit", 2,
                             "--device", "cpu", "--no-record", "-q")
    assert code == 0, err
    assert "my_copa" in out and not (checkpoint / "eval_results.json").exists()


def test_write_tasks_for_plain_lm_eval(data_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", "--write-tasks", tmp_path / "inc", "--data-dir", data_dir)
    assert code == 0, err
    assert "lm_eval --model hf" in out and (tmp_path / "inc" / "hellaswag.yaml").is_file()


def test_eval_runtime_flags_and_checkpoint_section(checkpoint, data_dir, capsys):
    """eval takes the same runtime flags as generate/ppl (asymmetric K/V too) on top of the recorded section."""
    meta = json.loads((checkpoint / "llmprune.json").read_text())
    meta["recipe"]["runtime"] = {"kv_sparsity": 0.5}
    (checkpoint / "llmprune.json").write_text(json.dumps(meta))
    common = ["eval", checkpoint, "--tasks", "copa", "--data-dir", data_dir, "--limit", 2, "--device", "cpu", "-q"]
    code, out, err = run_cli(capsys, *common)
    assert code == 0, err
    assert "KV bitmap cache, 50% of K/V pruned, window 32" in out
    code, out, err = run_cli(capsys, *common, "--k-sparsity", 0.5, "--v-sparsity", 0.25, "--kv-window", 16)
    assert code == 0, err
    stored = json.loads((checkpoint / "eval_results.json").read_text())["lm_eval"]
    assert stored["copa[kv_sparsity=0.5]"]["runtime"] == {"kv_sparsity": 0.5}
    key = "copa[kv_k_sparsity=0.5,kv_v_sparsity=0.25,kv_window=16]"
    assert stored[key]["runtime"] == {"kv_k_sparsity": 0.5, "kv_v_sparsity": 0.25, "kv_window": 16}
    code, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--data-dir", data_dir, "--gates",
                           checkpoint / "none", "-q")
    assert code == 2 and "no attention gates" in err


def test_bad_eval_flags(checkpoint, data_dir, capsys):
    assert run_cli(capsys, "eval", checkpoint, "--data-dir", data_dir)[0] == 2  # no --tasks
    code, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--data-dir", checkpoint / "nope")
    assert code == 2 and "is not a directory" in err
    code, _, err = run_cli(capsys, "eval", checkpoint, "--tasks", "copa", "--batch-size", "x", "--data-dir", data_dir)
    assert code == 2 and "--batch-size" in err


def test_ppl_result_stored_with_checkpoint(checkpoint, tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(tiny_text(300, seed=i) for i in range(3)))
    common = ["--data-path", text, "--seqlen", 64, "--max-windows", 2, "--device", "cpu", "-q"]
    assert run_cli(capsys, "ppl", checkpoint, *common)[0] == 0
    assert run_cli(capsys, "ppl", tiny_model_dir, *common, "--baseline-of", checkpoint)[0] == 0
    stored = json.loads((checkpoint / "eval_results.json").read_text())
    key = "wikitext2[seqlen=64,windows=2]"
    assert stored["ppl"][key]["windows"] == 2 and stored["ppl"][key]["ppl"] > 1
    assert stored["baseline"]["ppl"][key]["model"] == str(tiny_model_dir)
    assert not (tiny_model_dir / "eval_results.json").exists()  # not a checkpoint of ours: nothing written there
