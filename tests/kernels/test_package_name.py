"""The top-level kernels/ folder is ``llmprune.kernels``; from a checkout it must not replace the PyPI ``kernels``."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import kernels, llmprune.kernels
print(kernels.__file__)
print(llmprune.kernels.__file__)
"""


def test_bare_kernels_from_checkout_is_the_pypi_package():
    # `python -c` from the repository root puts the root on sys.path, as `python -m pytest` does.
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True)
    ours = str(ROOT / "kernels" / "__init__.py")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert run.returncode != 0 and "No module named 'kernels'" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    bare, pkg = run.stdout.split()
    assert pkg == ours
    assert bare != ours and Path(bare).parent.name == "kernels"
