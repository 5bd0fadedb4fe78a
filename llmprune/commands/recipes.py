"""``llmprune recipes``: the shipped recipes (usable by name: ``--recipe wanda-2of4``); with a NAME, its YAML."""

from __future__ import annotations

import argparse

from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import ConfigError
from llmprune.recipe_files import available_recipes, describe, find_recipe

NAME = "recipes"
HELP = "list the shipped recipes (use one with --recipe NAME); with NAME, print its YAML to start your own"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, help="print this recipe's YAML (e.g. wanda-2of4)")
    add_json_argument(p, "the list")


def run(args: argparse.Namespace) -> int:
    target = json_target(args)
    recipes = available_recipes()
    if args.name is not None:
        path = find_recipe(args.name)
        if path is None:
            raise ConfigError(f"no shipped recipe named {args.name!r} (available: {', '.join(recipes)})")
        print(path.read_text(encoding="utf-8"), end="", file=text_stream(args))
        emit_json(target, {"name": path.stem, "path": str(path), "yaml": path.read_text(encoding="utf-8")})
        return 0
    out = text_stream(args)
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {describe(path)}", file=out)
    example = "wanda-2of4" if "wanda-2of4" in recipes else next(iter(recipes), "NAME")
    print(f"\nuse: llmprune compress MODEL --recipe {example}  "
          "(or `llmprune recipes NAME > my.yaml` to edit one)", file=out)
    emit_json(target, [{"name": n, "path": str(p), "description": describe(p)} for n, p in recipes.items()])
    return 0
