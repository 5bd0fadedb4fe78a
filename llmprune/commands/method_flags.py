"""Command-line flags for every method option, generated from the registered method configs (so they can't drift).

Each field of a method's config dataclass (``SparseGPTConfig.blocksize`` -> ``--blocksize``, ``CFSPConfig.allocation``
-> ``--allocation``) becomes a flag; its help is the field's line in the config's ``Attributes:`` docstring, its
type the field's annotation, its default None (= the recipe's value, else the config's default, shown in the
help). ``sparsity`` and ``ignore`` have their own flags. When the natural spelling is already another option of the
command (``--recover-lr`` is the ``--recover`` learning rate), the field gets ``--<method>-<field>``
(``--cfsp-recover-lr``). A new method, or a new field, gets its flag with no change here.

Which method a flag applies to is checked when the recipe is built (:func:`method_options`), against the chosen
method's config.

The config classes live in the method modules, which import torch (seconds). So that ``llmprune compress --help``
(and parsing the command line) imports no torch, the CLI reads the fields from :mod:`method_schema_table`, a
generated copy of :func:`schema_of` of the built-in methods (``python -m llmprune.commands.method_flags`` rewrites
it; ``tests/cli/test_method_flags.py`` fails when it differs from the live config dataclasses). Once the methods
are imported anyway (``llmprune.builtins`` loaded, e.g. by a program that registered its own method), the live
configs are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

#: fields every method has, with flags of their own (``--sparsity``, ``--ignore``)
SHARED_FIELDS = ("sparsity", "ignore")
_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "": None}
#: method -> [(field, kind: "int"/"float"/"str"/"bool"/"" (any other type), repr(default), str(default), doc)]
Schema = dict[str, list[tuple[str, str, str, str, str]]]


@dataclasses.dataclass(frozen=True)
class MethodFlag:
    """One generated flag: ``dest`` on the namespace, the config ``field`` it sets, the ``methods`` that have it."""

    dest: str
    option: str
    field: str
    methods: tuple[str, ...]


def _field_docs(cls: type) -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` sections of ``cls`` and its bases (Google style)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        section = re.split(r"^Attributes:\s*$", text, maxsplit=1, flags=re.M)
        if len(section) < 2:
            continue
        current = None
        for line in section[1].splitlines():
            m = re.match(r"^    (\w+)(?: \([^)]*\))?: (.*)$", line)
            if m:
                current = m.group(1)
                docs[current] = m.group(2).strip()
            elif current and line.startswith("        "):
                docs[current] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                break  # the next section
    plain = (r":\w+:`~?([^`]*)`", r"``([^`]*)``")  # Sphinx roles and literals -> plain text for --help
    for pattern in plain:
        docs = {k: re.sub(pattern, r"\1", v) for k, v in docs.items()}
    return {k: v.rstrip(".") for k, v in docs.items()}


def _scalar(hint: Any) -> type | None:
    """``int``/``float``/``str``/``bool`` for a field annotation (``X | None`` -> ``X``), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] / X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (int, float, str, bool) else None


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else None


def schema_of(methods: dict[str, type]) -> Schema:
    """The flag-relevant facts of each method config's init fields (JSON/literal-friendly, see :data:`Schema`)."""
    out: Schema = {}
    for name, cls in methods.items():
        hints, docs = typing.get_type_hints(cls), _field_docs(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.name not in SHARED_FIELDS and f.init:
                kind = _scalar(hints.get(f.name))
                default = _default(f)
                rows.append((f.name, kind.__name__ if kind else "", repr(default), str(default), docs.get(f.name, "")))
        out[name] = rows
    return out


def builtin_schema() -> Schema:
    """The method schema the CLI uses: the live configs once the methods are imported, else the generated table
    (no torch; see the module docstring)."""
    if "llmprune.builtins" in sys.modules:
        from llmprune.prune.registry import available_methods, get_method

        return schema_of({name: get_method(name).config_cls for name in available_methods()})
    from llmprune.commands.method_schema_table import SCHEMA

    return {m: [tuple(r) for r in rows] for m, rows in SCHEMA.items()}


def write_schema_table(path: Path | None = None) -> Path:
    """Regenerate :mod:`llmprune.commands.method_schema_table` from the live built-in method configs."""
    import llmprune.builtins  # noqa: F401 - the live configs
    from llmprune.prune.registry import available_methods, get_method

    schema = schema_of({name: get_method(name).config_cls for name in available_methods()})
    path = path or Path(__file__).with_name("method_schema_table.py")
    body = "".join(f"    {m!r}: [\n" + "".join(f"        {row!r},\n" for row in rows) + "    ],\n"
                   for m, rows in schema.items())
    path.write_text('"""Generated by ``python -m llmprune.commands.method_flags`` from the built-in method configs: '
                    'do not edit."""\n\n# fmt: off\n# ruff: noqa: E501\nSCHEMA = {\n' + body + "}\n")
    return path


def _fields(schema: Schema) -> dict[str, list[tuple[str, str, str, str, str]]]:
    """field name -> [(method, kind, repr(default), str(default), doc)] over the methods, in schema order."""
    out: dict[str, list] = {}
    for name, rows in schema.items():
        for field, kind, default_repr, default_str, doc in rows:
            out.setdefault(field, []).append((name, kind, default_repr, default_str, doc))
    return out


def add_method_arguments(
    parser: argparse.ArgumentParser, methods: dict[str, type] | Schema, shared: tuple[str, ...] = ()
) -> list[MethodFlag]:
    """Add one flag per method-config field to ``parser``, after its other options.

    Args:
        parser: the command's parser.
        methods: method name -> config class, or their :func:`schema_of` (e.g. :func:`builtin_schema`).
        shared: fields whose natural flag the command already defines and that also set the method field
            (``recover_steps``: ``--recover-steps`` is the ``--recover`` steps, and cfsp's LoRA steps without it).

    Returns:
        The flags (also stored on the namespace as ``_method_flags``).
    """
    group = parser.add_argument_group("method options (from the method configs; given flags override the recipe)")
    taken = set(parser._option_string_actions)  # the options the command already has
    flags: list[MethodFlag] = []
    schema = methods if all(isinstance(v, list) for v in methods.values()) else schema_of(methods)
    for field, owners in _fields(schema).items():
        natural = "--" + field.replace("_", "-")
        if field in shared and natural in taken:  # defined by the command: only recorded as a method option
            flags.append(MethodFlag(field, natural, field, tuple(m for m, *_ in owners)))
            continue
        if natural not in taken:
            specs = [(natural, field, tuple(m for m, *_ in owners), owners)]
        else:  # the spelling is another option's: one prefixed flag per method
            specs = [(f"--{m}-{natural[2:]}", f"{m}_{field}", (m,), [o]) for o in owners for m in [o[0]]]
        for option, dest, owner_names, rows in specs:
            kind = _KINDS[rows[0][1]]
            parts = [(m, doc or field, r, v) for m, _, r, v, doc in rows]
            if len({(d, r) for _, d, r, _ in parts}) == 1:  # one meaning: "cfsp/slicegpt: ... (default 8)"
                help_text = f"{'/'.join(owner_names)}: {parts[0][1]} (default {parts[0][3]})"
            else:
                help_text = "; ".join(f"{m}: {d} (default {v})" for m, d, _, v in parts)
            help_text = help_text.replace("%", "%%")
            if kind is bool:
                group.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                group.add_argument(option, dest=dest, type=kind or str, default=None, help=help_text,
                                   metavar=field.upper())
            taken.add(option)
            flags.append(MethodFlag(dest, option, field, owner_names))
    parser.set_defaults(_method_flags=flags)
    return flags


def given(args: argparse.Namespace, extra: tuple[MethodFlag, ...] = ()) -> list[tuple[MethodFlag, Any]]:
    """The method flags set on the command line (``extra``: flags defined by hand that are method options)."""
    flags = [*extra, *getattr(args, "_method_flags", [])]
    return [(f, getattr(args, f.dest)) for f in flags if getattr(args, f.dest, None) is not None]


def method_options(args: argparse.Namespace, method, extra: tuple[MethodFlag, ...] = ()) -> dict[str, Any]:
    """``field -> value`` of the method flags given, checked against ``method`` (a registry entry); a flag of
    another method is a :class:`~llmprune.errors.ConfigError` naming the methods it applies to."""
    from llmprune.errors import ConfigError

    out = {}
    for flag, value in given(args, extra):
        if method.name not in flag.methods:
            raise ConfigError(f"{flag.option} does not apply to method {method.name!r} "
                              f"(only to {', '.join(flag.methods)})")
        out[flag.field] = value
    return out


if __name__ == "__main__":  # regenerate the table: python -m llmprune.commands.method_flags
    print(f"wrote {write_schema_table()}")
