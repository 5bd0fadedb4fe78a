"""`import llmprune` and `llmprune --help` stay light (no torch), and the transformers hooks still register.

Each case runs in a fresh interpreter: what is imported, and when the built-ins register, depend on the order of
imports in a new process.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_llama

from llmprune.model.access import decoder_layers
from llmprune.model.structured import sync_config
from llmprune.prune.structured import prune_mlp_channels

HEAVY = ("torch", "transformers", "numpy", "safetensors", "huggingface_hub")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned parsed."""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


REPORT = f"import json, sys; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_top_level_help_and_version_import_no_torch(argv):
    code = (
        "import contextlib, io, sys\n"
        "from llmprune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    code = main({argv!r})\n"
        "assert 'compress' in out.getvalue() or 'llmprune ' in out.getvalue(), out.getvalue()\n"
        f"{REPORT}"
    )
    assert _run(code) == []


def test_import_llmprune_is_light_and_names_resolve_lazily():
    code = (
        "import llmprune\n"
        "assert llmprune.ConfigError.__module__ == 'llmprune.errors'\n"
        "assert 'load' in dir(llmprune) and 'WandaConfig' in llmprune.__all__\n"
        f"{REPORT}"
    )
    assert _run(code) == []


def test_unknown_attribute_is_an_attribute_error():
    import llmprune

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llmprune.nope  # noqa: B018


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory):
    """A checkpoint with per-layer FFN sizes (model type ``llmprune_llama``): plain transformers needs the hooks."""
    model = tiny_llama()
    for i, layer in enumerate(decoder_layers(model)):
        prune_mlp_channels(layer, torch.arange(0, 128, 2 + i))
    sync_config(model)
    d = tmp_path_factory.mktemp("structured") / "m"
    model.save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["model_type"] == "llmprune_llama"
    return d


LOAD = (
    "m = AutoModelForCausalLM.from_pretrained({d!r})\n"
    "cfg = llmprune.WandaConfig(sparsity='2:4')\n"  # a public name on first use; the methods are registered
    "print(json.dumps([m.config.model_type, [l.mlp.down_proj.in_features for l in m.model.layers],\n"
    "                  type(cfg).__name__, llmprune.available_methods()]))"
)


@pytest.mark.parametrize("imports", [
    "import llmprune\nfrom transformers import AutoModelForCausalLM",  # the promise: import llmprune first
    # transformers first imported inside an llmprune module's import: registers once that import is done
    "import llmprune.model.loading\nfrom transformers import AutoModelForCausalLM",
])
def test_import_llmprune_makes_plain_transformers_load_structured_checkpoints(structured_dir, imports):
    model_type, sizes, cfg, methods = _run(f"import json\n{imports}\nimport llmprune\n" + LOAD.format(d=str(structured_dir)))
    assert model_type == "llmprune_llama" and sizes == [64, 43]
    assert cfg == "WandaConfig" and {"magnitude", "wanda", "sparsegpt", "cfsp"} <= set(methods)


@pytest.mark.parametrize("command, flag", [("compress", "--blocksize"), ("ppl", "--kv-sparsity"),
                                           ("eval", "--kv-sparsity"), ("generate", "--kv-sparsity"),
                                           ("bench", "--kv-sparsity")])
def test_subcommand_help_imports_no_torch(command, flag):
    # compress: the method flags come from the generated schema table (commands/method_schema_table.py, checked
    # against the live configs in test_method_flags.py); the runtime flags from llmprune.runtime.flags
    code = (
        "import contextlib, io, sys\n"
        "from llmprune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    assert main([{command!r}, '--help']) == 0\n"
        f"assert {flag!r} in out.getvalue(), out.getvalue()\n"
        f"{REPORT}"
    )
    assert _run(code) == []
