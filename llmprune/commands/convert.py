"""``llmprune convert``: rewrite a checkpoint in another on-disk format (``dense`` <-> ``packed``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from llmprune.errors import LlmpruneError
from llmprune.formats.checkpoint import check_output, get_format, read_metadata, save_checkpoint
from llmprune.model.loading import load_tokenizer
from llmprune.runtime.load import load_model
from llmprune.runtime.sparse24 import unpack_model

NAME = "convert"
HELP = "convert a checkpoint between formats (dense: loads anywhere; packed: 2:4 values + metadata)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (written by llmprune, or any HF folder with 2:4 linears)")
    p.add_argument("--format", required=True, help="target format: dense or packed")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def convert(src: str | Path, fmt: str, output: str | Path, *, overwrite: bool = False, command: str | None = None):
    """Load ``src`` and save it in format ``fmt`` at ``output``; returns the output path.

    Packed -> dense unpacks every :class:`~llmprune.runtime.sparse24.Sparse24Linear` into an ``nn.Linear``; dense ->
    packed packs the 2:4 linears of the decoder layers (refused when there is none).
    """
    src = Path(src).expanduser()
    if not (src / "config.json").is_file():
        raise LlmpruneError(f"{src} is not a checkpoint directory (no config.json)")
    get_format(fmt)
    output = check_output(output, overwrite, inputs=[src])
    meta = read_metadata(src) or {}
    model = load_model(str(src), gates=False)  # weights only: gates files are not part of the format
    try:
        tokenizer = load_tokenizer(str(src))
    except LlmpruneError:
        tokenizer = None
    if fmt != "packed":
        unpack_model(model)
    meta = {**meta, "converted_from": meta.get("format", "dense")}
    if command:
        meta["convert_command"] = command
    meta.pop("format", None)
    return save_checkpoint(model, tokenizer, output, metadata=meta, format=fmt, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    out = convert(
        args.model, args.format, args.output, overwrite=args.overwrite,
        command=shlex.join(["llmprune", *sys.argv[1:]]),
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {args.format} checkpoint to {out} ({size / 2**20:.1f} MiB)")
    return 0
