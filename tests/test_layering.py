"""Package structure invariants that the import-linter contracts (pyproject.toml) cannot see."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACE_NAMES = {"__version__"}  # anything imported from the face `llmprune` itself, not from a submodule


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def _subpackages() -> set[str]:
    pkg = ROOT / "llmprune"
    names = {p.stem for p in pkg.glob("*.py")} | {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    return names | {"kernels"}


def test_no_library_module_imports_the_package_face():
    subs = _subpackages()
    bad = []
    for path in sorted((ROOT / "llmprune").rglob("*.py")):
        if path == ROOT / "llmprune" / "__init__.py":
            continue
        for line, module, name in _imports(path):
            if module == "llmprune" and (name is None or name not in subs):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name or 'llmprune'} from the package face")
    assert not bad, "\n".join(bad)


def test_kernels_import_only_torch_triton_and_byte_layouts():
    allowed_llmprune = {"llmprune.formats.sparse24", "llmprune.formats.bitmap", "llmprune.errors"}
    bad = []
    stdlib = {"__future__", "math", "os", "functools", "typing"}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        # __init__.py: the import machinery that hands the bare name `kernels` to the PyPI package (its comment)
        allowed = stdlib | ({"importlib", "sys"} if path.name == "__init__.py" else set())
        for line, module, _ in _imports(path):
            top = module.split(".")[0]
            if top == "llmprune" and module not in allowed_llmprune:
                bad.append(f"{path.name}:{line} imports {module}")
            elif top not in {"llmprune", "torch", "triton"} | allowed:
                bad.append(f"{path.name}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_every_package_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llmprune").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
