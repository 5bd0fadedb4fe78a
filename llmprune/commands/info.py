"""``llmprune info DIR``: what a checkpoint holds, measured from its files (format, dtype, bytes, parameters,
per-module sparsity and N:M validity, base model, runtime options, stored results)."""

from __future__ import annotations

import argparse

from llmprune.commands.jsonout import add_json_argument, emit_json, json_target, text_stream

NAME = "info"
HELP = "describe a checkpoint: format, dtype, size, parameters, measured sparsity, base model, results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="checkpoint directory (llmprune's or any Hugging Face folder)")
    p.add_argument("--modules", action="store_true", help="list every module's measured sparsity")
    p.add_argument("--no-sparsity", action="store_true", help="headers only: do not read the weights")
    add_json_argument(p, "the full description")


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from llmprune.evaluate.inspect import inspect_checkpoint

    target = json_target(args)
    info = inspect_checkpoint(args.directory, sparsity=not args.no_sparsity)
    out = text_stream(args)
    lm = info.get("llmprune") or {}
    print(f"{info['directory']}: {info['format']} checkpoint, {info['model_type']}, {info['dtype']}", file=out)
    print(f"  parameters   {info['parameters']:,} ({info['stored_elements']:,} stored)", file=out)
    print(f"  bytes        weights {_mib(info['bytes']['weights'])}, folder {_mib(info['bytes']['total'])}", file=out)
    if isinstance(info.get("intermediate_sizes"), list):
        print(f"  FFN sizes    {info['intermediate_sizes']}", file=out)
    if info.get("base_model"):
        print(f"  base model   {info['base_model']}", file=out)
    for stage in lm.get("stages") or []:
        print(f"  stage        {stage.get('method')} {stage.get('sparsity')}", file=out)
    if lm.get("converted_from"):
        print(f"  converted    from {lm['converted_from']}", file=out)
    if lm.get("calibration"):
        cal = lm["calibration"]
        print(f"  calibration  {cal.get('source')}, {cal.get('nsamples')} x {cal.get('seqlen')}, seed {cal.get('seed')}",
              file=out)
    if lm.get("runtime"):
        print(f"  runtime      {lm['runtime']}", file=out)
    sp = info.get("sparsity")
    if sp:
        s = sp["summary"]
        nm = ", ".join(f"{k.removesuffix('_valid')} valid in {v}" for k, v in s.items() if k.endswith("_valid"))
        overall = "—" if s["overall"] is None else f"{s['overall']:.2%}"
        print(f"  sparsity     {overall} zeros over {s['modules']} decoder linears (measured){'; ' + nm if nm else ''}",
              file=out)
        if args.modules:
            for name, m in sp["modules"].items():
                flags = " ".join(f"{k}={'ok' if v else 'NO'}" for k, v in m.items() if ":" in k)
                print(f"    {name:<48} {m['shape'][0]}x{m['shape'][1]:<6} {m['sparsity']:.2%} "
                      f"{'packed ' if m['packed'] else ''}{flags}", file=out)
    for section, entries in (info.get("results") or {}).items():
        if section != "baseline" and isinstance(entries, dict):
            print(f"  results      {section}: {', '.join(sorted(entries))}", file=out)
    emit_json(target, info)
    return 0
