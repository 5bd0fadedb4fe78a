from pathlib import Path

import pytest

import llmprune
from llmprune.errors import ConfigError
from llmprune.recipe import dump_recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"wanda-2of4.yaml", "sparsegpt-2of4.yaml", "magnitude-50.yaml", "wanda-50.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path):
    recipe = load_recipe(path)
    assert recipe.stages
    again = recipe_from_dict(__import__("yaml").safe_load(dump_recipe(recipe)))
    assert again.to_dict() == recipe.to_dict()


def test_wanda_2of4_contents():
    r = load_recipe(Path(__file__).parents[1] / "recipes" / "wanda-2of4.yaml")
    assert isinstance(r.stages[0], llmprune.WandaConfig)
    assert str(r.stages[0].sparsity) == "2:4"
    assert r.calibration.nsamples == 128 and r.calibration.seqlen == 2048


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"prune": [{"method": "wanda", "sparsity": "2:4"}], "extra": 1}, "extra: unknown key"),
        ({"prune": [{"method": "wanda", "sparsity": "2:4", "foo": 1}]}, "prune[0].foo: unknown key"),
        ({"prune": [{"sparsity": "2:4"}]}, "prune[0].method: missing"),
        ({"prune": [{"method": "nope", "sparsity": "2:4"}]}, "prune[0].method: unknown method"),
        ({"prune": [{"method": "wanda", "sparsity": 124}]}, "quote N:M"),
        ({"prune": [{"method": "wanda", "sparsity": 1.5}]}, "prune[0]: invalid sparsity"),
        ({"prune": [{"method": "wanda"}], "calibration": {"nsamples": -1}}, "calibration: nsamples"),
        ({"prune": [{"method": "wanda"}], "calibration": {"sample": 3}}, "calibration.sample: unknown key"),
        ({"prune": [{"method": "wanda"}], "runtime": {"kv_sparsity": 2}}, "runtime.kv_sparsity"),
        ({"prune": {"method": "wanda"}}, "expected a list"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_strict_validation(data, needle):
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict(data)
    assert needle in str(exc.value)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("prune: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(p)
