"""``llmprune push``: upload a checkpoint (with a fresh model card) to the Hugging Face Hub."""

from __future__ import annotations

import argparse

NAME = "push"
HELP = "upload a checkpoint to the Hugging Face Hub (model card generated; token from the HF login/env)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="checkpoint directory")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--no-card", action="store_true", help="keep the directory's README.md as is")
    p.add_argument("--revision", default=None, help="branch to upload to (created when missing; default main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")


def run(args: argparse.Namespace) -> int:
    from llmprune.publish.hub import push  # heavy imports when the command runs: `--help` answers at once

    url = push(args.directory, args.repo, private=args.private, commit_message=args.message,
               write_card=not args.no_card, revision=args.revision, create_pr=args.create_pr, token=args.token)
    print(f"pushed {args.directory} to {url}")
    return 0
