"""Shipped recipes: one source (the top-level recipes/ folder), in the wheel as package data, usable by name."""

import json
from pathlib import Path

import pytest
import tomllib
from helpers import run_cli

import llmprune
from llmprune.errors import ConfigError
from llmprune.recipe import load_recipe
from llmprune.recipe_files import available_recipes, find_recipe

ROOT = Path(__file__).parents[1]


def test_the_wheel_ships_the_recipes_folder_as_package_data():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["llmprune.recipes"] == "recipes" and "llmprune.recipes" in setup["packages"]
    assert setup["package-data"]["llmprune.recipes"] == ["*.yaml"]
    assert not (ROOT / "llmprune" / "recipes").exists()  # one source of truth: no second copy in the tree


def test_every_file_in_recipes_is_available_by_name():
    files = sorted((ROOT / "recipes").glob("*.yaml"))
    assert available_recipes() == {p.stem: p.resolve() for p in files}
    assert find_recipe("wanda-2of4") == find_recipe("wanda-2of4.yaml") == (ROOT / "recipes/wanda-2of4.yaml").resolve()
    assert find_recipe("nope") is None and find_recipe("recipes/wanda-2of4") is None  # a path is never a name


def test_load_recipe_by_name_equals_the_file(tmp_path, monkeypatch):
    assert load_recipe("sparsegpt-2of4").to_dict() == load_recipe(ROOT / "recipes/sparsegpt-2of4.yaml").to_dict()
    monkeypatch.chdir(tmp_path)  # a local file of that name wins over the shipped recipe
    (tmp_path / "wanda-2of4.yaml").write_text('prune:\n  - method: magnitude\n    sparsity: "2:4"\n')
    assert isinstance(load_recipe("wanda-2of4.yaml").stages[0], llmprune.MagnitudeConfig)
    with pytest.raises(ConfigError, match=r"recipe file not found: nope \(shipped recipes, usable by name: .*wanda-2of4"):
        load_recipe("nope")


def test_recipes_command_lists_and_prints(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    assert [ln.split()[0] for ln in out.splitlines()[: len(available_recipes())]] == list(available_recipes())
    code, out, _ = run_cli(capsys, "recipes", "wanda-2of4")
    assert code == 0 and out == (ROOT / "recipes/wanda-2of4.yaml").read_text()
    code, out, err = run_cli(capsys, "recipes", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} == set(available_recipes())
    code, _, err = run_cli(capsys, "recipes", "nope")
    assert code == 2 and "no shipped recipe named 'nope'" in err


def test_compress_with_a_recipe_name(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--recipe", "magnitude-50", "--device", "cpu",
                           "-o", tmp_path / "o", "-q")
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "llmprune.json").read_text())
    assert meta["recipe"]["prune"] == load_recipe("magnitude-50").to_dict()["prune"]
