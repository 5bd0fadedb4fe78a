"""``llmprune convert``: rewrite a checkpoint in another on-disk format (``dense`` <-> ``packed``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream
from llmprune.errors import LlmpruneError

NAME = "convert"
HELP = "convert a checkpoint between formats (dense: loads anywhere; packed: 2:4 values + metadata)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (written by llmprune, or any HF folder with 2:4 linears)")
    p.add_argument("--format", required=True, help="target format: dense or packed")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dtype", default="auto", help="dtype of the written weights: auto (the source's), float32, "
                                                   "bfloat16, float16")
    add_json_argument(p, "what was written")


def convert(src: str | Path, fmt: str, output: str | Path, *, overwrite: bool = False, command: str | None = None,
            dtype: str = "auto"):
    """Load ``src`` (in ``dtype``; ``auto``: its own) and save it in format ``fmt`` at ``output``; returns the path.

    Packed -> dense unpacks every :class:`~llmprune.runtime.sparse24.Sparse24Linear` into an ``nn.Linear``; dense ->
    packed packs the 2:4 linears of the decoder layers (refused when there is none).
    """
    from llmprune.formats.checkpoint import check_output, get_format, read_metadata, save_checkpoint
    from llmprune.formats.metadata import portable_command, record_path, resolve_base_model
    from llmprune.model.loading import load_tokenizer, parse_dtype
    from llmprune.runtime.load import load_model
    from llmprune.runtime.sparse24 import unpack_model

    src = Path(src).expanduser()
    if not (src / "config.json").is_file():
        raise LlmpruneError(f"{src} is not a checkpoint directory (no config.json)")
    get_format(fmt)
    parse_dtype(dtype)
    output = check_output(output, overwrite, inputs=[src])
    meta = read_metadata(src) or {}
    model = load_model(str(src), gates=False, dtype=dtype)  # weights only: gates files are not part of the format
    try:
        tokenizer = load_tokenizer(str(src))
    except LlmpruneError:
        tokenizer = None
    if fmt != "packed":
        unpack_model(model)
    meta = {**meta, "converted_from": meta.get("format", "dense")}
    if meta.get("base_model") and meta.get("paths") == "relative":  # relative to the new checkpoint, not the source
        base = resolve_base_model(src, meta)
        if Path(base).is_absolute() and Path(base).exists():
            meta["base_model"] = record_path(base, output)
    if dtype != "auto":
        meta["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if command:
        # paths relative to the new checkpoint, as the compress command is recorded (llmprune.json "paths")
        meta["convert_command"] = portable_command(command, output, meta.get("paths") or "relative")
    meta.pop("format", None)
    return save_checkpoint(model, tokenizer, output, metadata=meta, format=fmt, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    target = json_target(args)
    out = convert(
        args.model, args.format, args.output, overwrite=args.overwrite,
        command=shlex.join(["llmprune", *sys.argv[1:]]), dtype=args.dtype,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {args.format} checkpoint to {out} ({size / 2**20:.1f} MiB)", file=text_stream(args))
    emit_json(target, {"output": str(out), "format": args.format, "bytes": size})
    return 0
