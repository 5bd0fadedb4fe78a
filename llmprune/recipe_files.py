"""The recipes shipped with llmprune, by name: ``--recipe wanda-2of4`` reads ``wanda-2of4.yaml``.

One source of truth: the repository's top-level ``recipes/`` folder. The wheel ships it as the package data
``llmprune/recipes/*.yaml`` (``package-dir`` in ``pyproject.toml``), a source checkout or editable install reads
the folder itself; :func:`recipe_dirs` looks in both places.
"""

from __future__ import annotations

import os
from pathlib import Path

_SUFFIX = ".yaml"


def recipe_dirs() -> list[Path]:
    """Where shipped recipes are: the installed package data, then the source checkout's ``recipes/``."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "recipes", here.parent / "recipes") if d.is_dir()]


def available_recipes() -> dict[str, Path]:
    """Shipped recipe name -> file, sorted by name (the first directory of :func:`recipe_dirs` wins)."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob(f"*{_SUFFIX}")):
            found.setdefault(path.name[: -len(_SUFFIX)], path)
    return dict(sorted(found.items()))


def find_recipe(ref: str | os.PathLike) -> Path | None:
    """The file of a shipped recipe named ``ref`` (``wanda-2of4`` or ``wanda-2of4.yaml``), or None.

    A name only: anything with a directory part is a path, never looked up here.
    """
    name = os.fspath(ref)
    if os.sep in name or "/" in name or not name:
        return None
    return available_recipes().get(name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name)


def describe(path: Path) -> str:
    """The recipe's first comment line (what it does), without the ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
