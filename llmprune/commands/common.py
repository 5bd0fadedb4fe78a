"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser, *, positional_help: str) -> None:
    parser.add_argument("model", nargs="?", default=None, help=positional_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (checkpoint's), float32, float16, bfloat16")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the Hub (off by default)"
    )
