"""Command-line flags for every method option, generated from the registered method configs (so they can't drift).

Each field of a method's config dataclass (``SparseGPTConfig.blocksize`` -> ``--blocksize``, ``CFSPConfig.allocation``
-> ``--allocation``) becomes a flag; its help is the field's line in the config's ``Attributes:`` docstring, its
type the field's annotation, its default None (= the recipe's value, else the config's default, shown in the
help). ``sparsity`` and ``ignore`` have their own flags. When the natural spelling is already another option of the
command (``--recover-lr`` is the ``--recover`` learning rate), the field gets ``--<method>-<field>``
(``--cfsp-recover-lr``). A new method, or a new field, gets its flag with no change here.

Which method a flag applies to is checked when the recipe is built (:func:`method_options`), against the chosen
method's config.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any

#: fields every method has, with flags of their own (``--sparsity``, ``--ignore``)
SHARED_FIELDS = ("sparsity", "ignore")


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


def _fields(methods: dict[str, type]) -> dict[str, list[tuple[str, dataclasses.Field, type | None, str]]]:
    """field name -> [(method, field, scalar type, doc)] over the method configs, in registry order."""
    out: dict[str, list] = {}
    for name, cls in methods.items():
        hints, docs = typing.get_type_hints(cls), _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name not in SHARED_FIELDS and f.init:
                out.setdefault(f.name, []).append((name, f, _scalar(hints.get(f.name)), docs.get(f.name, "")))
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else None


def add_method_arguments(
    parser: argparse.ArgumentParser, methods: dict[str, type], shared: tuple[str, ...] = ()
) -> list[MethodFlag]:
    """Add one flag per method-config field to ``parser``, after its other options.

    Args:
        parser: the command's parser.
        methods: method name -> config class.
        shared: fields whose natural flag the command already defines and that also set the method field
            (``recover_steps``: ``--recover-steps`` is the ``--recover`` steps, and cfsp's LoRA steps without it).

    Returns:
        The flags (also stored on the namespace as ``_method_flags``).
    """
    group = parser.add_argument_group("method options (from the method configs; given flags override the recipe)")
    taken = set(parser._option_string_actions)  # the options the command already has
    flags: list[MethodFlag] = []
    for field, owners in _fields(methods).items():
        natural = "--" + field.replace("_", "-")
        if field in shared and natural in taken:  # defined by the command: only recorded as a method option
            flags.append(MethodFlag(field, natural, field, tuple(m for m, *_ in owners)))
            continue
        if natural not in taken:
            specs = [(natural, field, tuple(m for m, *_ in owners), owners)]
        else:  # the spelling is another option's: one prefixed flag per method
            specs = [(f"--{m}-{natural[2:]}", f"{m}_{field}", (m,), [o]) for o in owners for m in [o[0]]]
        for option, dest, owner_names, rows in specs:
            kind = rows[0][2]
            parts = [(m, doc or field, _default(fl)) for m, fl, _, doc in rows]
            if len({(d, repr(v)) for _, d, v in parts}) == 1:  # one meaning: "cfsp/slicegpt: ... (default 8)"
                help_text = f"{'/'.join(owner_names)}: {parts[0][1]} (default {parts[0][2]})"
            else:
                help_text = "; ".join(f"{m}: {d} (default {v})" for m, d, v in parts)
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
