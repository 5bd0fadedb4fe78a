"""``llmprune card DIR``: build the model card offline (what ``push`` would upload), print it or write it."""

from __future__ import annotations

import argparse
import sys

NAME = "card"
HELP = "build a checkpoint's model card offline (README.md + recipe.yaml; --print shows it without writing)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="llmprune checkpoint directory")
    p.add_argument("--repo", default=None, help="Hub repo id used as the card's title and in the snippets")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the card on stdout and write nothing")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import ModelCard

    from llmprune.publish.modelcard import build_card, write_card

    text = build_card(args.directory, repo_id=args.repo)
    ModelCard(text)  # parses the metadata block: malformed YAML fails here, not on the Hub
    if args.print_only:
        sys.stdout.write(text)
        return 0
    path = write_card(args.directory, repo_id=args.repo, text=text)
    print(f"wrote {path} and {path.with_name('recipe.yaml')}")
    return 0
