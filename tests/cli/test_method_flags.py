"""Every method-config field is a compress flag, generated from the config dataclasses (they cannot drift)."""

import argparse
import dataclasses

import pytest

from llmprune.cli import build_parser
from llmprune.commands.compress import recipe_from_args
from llmprune.commands.method_flags import SHARED_FIELDS, add_method_arguments, method_options, schema_of
from llmprune.commands.method_schema_table import SCHEMA
from llmprune.config import PruneConfig
from llmprune.errors import ConfigError
from llmprune.prune.registry import available_methods, get_method


def _args(*argv):
    return build_parser(only="compress").parse_args(["compress", *map(str, argv)])


def _stage(*argv):
    return recipe_from_args(_args(*argv)).stages[0]


def test_every_field_of_every_method_has_a_flag():
    flags = _args()._method_flags
    for name in available_methods():
        for f in dataclasses.fields(get_method(name).config_cls):
            if f.name not in SHARED_FIELDS:
                assert [fl for fl in flags if fl.field == f.name and name in fl.methods], (name, f.name)


def test_recipe_only_options_are_flags_now():
    s = _stage("--method", "sparsegpt", "--blocksize", 64, "--percdamp", 0.05)
    assert (s.blocksize, s.percdamp) == (64, 0.05)
    c = _stage("--method", "cfsp", "--sparsity", 0.3, "--allocation", "uniform", "--lora-rank", 4, "--power", 2,
               "--cfsp-recover-lr", 1e-3, "--cfsp-recover-batch-size", 3)
    assert (c.allocation, c.lora_rank, c.power, c.recover_lr, c.recover_batch_size) == ("uniform", 4, 2.0, 1e-3, 3)


def test_existing_flag_names_keep_working():
    c = _stage("--method", "cfsp", "--sparsity", 0.3, "--prune-heads", "--min-ratio", 0.1, "--max-ratio", 0.5,
               "--round-to", 16, "--recover-steps", 5)
    assert (c.prune_heads, c.min_ratio, c.max_ratio, c.round_to, c.recover_steps) == (True, 0.1, 0.5, 16, 5)
    assert _stage("--method", "cfsp", "--sparsity", 0.3, "--no-prune-heads").prune_heads is False


def test_flags_override_a_recipe_and_keep_its_other_fields():
    s = _stage("--recipe", "sparsegpt-2of4", "--percdamp", 0.1)
    assert (s.percdamp, s.blocksize, str(s.sparsity)) == (0.1, 128, "2:4")


def test_a_flag_of_another_method_is_refused_naming_its_methods():
    with pytest.raises(ConfigError, match=r"--blocksize does not apply to method 'wanda' \(only to sparsegpt\)"):
        _stage("--method", "wanda", "--blocksize", 64)
    with pytest.raises(ConfigError, match=r"--round-to does not apply to method 'magnitude' \(only to cfsp, slicegpt\)"):
        _stage("--method", "magnitude", "--round-to", 16)
    with pytest.raises(ConfigError, match="allocation"):  # values are checked by the config, naming the field
        _stage("--method", "cfsp", "--sparsity", 0.3, "--allocation", "nope")


def test_a_new_method_gets_its_flags_without_code_changes():
    @dataclasses.dataclass
    class FooConfig(PruneConfig):
        """Foo.

        Attributes:
            alpha: how much ``foo``, in percent.
            seed: its own seed.
            fast: take shortcuts.
        """

        method = "foo"
        alpha: float = 0.5
        seed: int = 0
        fast: bool = False

    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int)  # the command's own --seed: the field gets --foo-seed
    flags = add_method_arguments(p, {"foo": FooConfig})
    assert [(f.option, f.dest, f.field) for f in flags] == [
        ("--alpha", "alpha", "alpha"), ("--foo-seed", "foo_seed", "seed"), ("--fast", "fast", "fast")]
    args = p.parse_args(["--alpha", "0.25", "--foo-seed", "3", "--seed", "9", "--fast"])
    method = type("M", (), {"name": "foo", "config_cls": FooConfig})
    assert method_options(args, method) == {"alpha": 0.25, "seed": 3, "fast": True}
    assert "foo: how much foo, in percent (default 0.5)" in p.format_help().replace("\n", " ").replace("  ", " ")


def test_the_generated_schema_table_matches_the_live_configs():
    # compress --help reads the table (no torch); a config change without `python -m llmprune.commands.method_flags`
    # fails here
    live = schema_of({name: get_method(name).config_cls for name in available_methods()})
    assert {m: [tuple(r) for r in rows] for m, rows in SCHEMA.items()} == live
    assert list(SCHEMA) == available_methods()


def test_table_and_live_configs_give_the_same_flags():
    table, live = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_method_arguments(table, {m: [tuple(r) for r in rows] for m, rows in SCHEMA.items()})
    add_method_arguments(live, {name: get_method(name).config_cls for name in available_methods()})
    assert table.format_help() == live.format_help()
    assert table.parse_args(["--blocksize", "64", "--prune-heads"]) == live.parse_args(["--blocksize", "64",
                                                                                       "--prune-heads"])
