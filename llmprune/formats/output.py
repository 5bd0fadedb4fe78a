"""Output directories: checked before any work, written beside the target, swapped in atomically.

Rules (every writer of a checkpoint goes through them):

* ``check_output`` runs before any work. An existing target is replaced only with ``overwrite`` and only if it
  is an llmprune checkpoint (it holds ``llmprune.json``); never the current directory or one of its
  ancestors, the home directory, a filesystem root, an input of the run, or a directory that contains an input.
  The nearest existing ancestor must be a writable directory (a probe file is created and removed there).
* A checkpoint is assembled in a hidden sibling ``.<name>.tmp-<pid>-*`` and swapped into place by
  :func:`move_into_place`: on Linux with one ``renameat2(RENAME_EXCHANGE)`` (a reader sees the old checkpoint
  or the new one, never neither), elsewhere with two renames. The old copy is deleted only after the swap.
* Siblings left by an interrupted save (``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` of a process that
  no longer runs) are removed by the next save of the same name; an ``old`` copy whose checkpoint is missing
  (a crash between the two fallback renames) is named in an error instead, since it may be the only copy.
* New directories get the permissions the umask allows (``mkdtemp`` alone would give 0700).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

METADATA_FILE = "llmprune.json"
_RENAME_EXCHANGE = 2


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_work_dir(output: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of ``output`` (``.<name>.<kind>-<pid>-XXXX``) with umask-honouring permissions."""
    output.parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{output.name}.{kind}-{os.getpid()}-", dir=output.parent))
    os.chmod(d, 0o777 & ~_umask())
    return d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(output: Path) -> list[tuple[Path, str, int | None]]:
    """``(path, kind, pid)`` of hidden siblings written by earlier saves of ``output``."""
    out = []
    if not output.parent.is_dir():
        return out
    for kind in ("tmp", "old"):
        for p in output.parent.glob(f".{output.name}.{kind}-*"):
            rest = p.name[len(f".{output.name}.{kind}-"):]
            head = rest.split("-", 1)[0]
            out.append((p, kind, int(head) if head.isdigit() and "-" in rest else None))
    return out


def clean_leftovers(output: Path) -> None:
    """Remove what interrupted saves of ``output`` left behind; refuse when it may be the only copy."""
    for path, kind, pid in _leftovers(output):
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue  # another save of the same output is running; its files are its own
        if kind == "old" and not output.exists():
            raise LlmpruneError(
                f"an interrupted save left the previous checkpoint of {output} at {path}; "
                f"move it back (mv {path}/x {output}) or delete it, then rerun"
            )
        log.warning("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def is_within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies below it (both resolved by the caller)."""
    return path == other or other in path.parents


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a dangling symlink counts: it blocks creation)."""
    anc = path
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    return anc


def unwritable_reason(directory: Path) -> str | None:
    """None when a file can be created in the existing ``directory`` (a probe file is made and removed), else why."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmprune-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _probe_writable(output: Path) -> None:
    anc = nearest_existing(output.parent)
    if not anc.is_dir():
        raise LlmpruneError(f"cannot create output {output}: {anc} is not a directory")
    reason = unwritable_reason(anc)
    if reason is not None:
        raise LlmpruneError(f"cannot write output {output}: {anc} is not writable ({reason})")


def check_output(output: str | os.PathLike, overwrite: bool, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output directory before any work starts (rules: module docstring).

    Args:
        output: the directory to write.
        overwrite: an existing llmprune checkpoint there may be replaced.
        inputs: local paths the run reads (model, calibration file, ...); never replaced or contained.

    Returns:
        ``output`` with ``~`` expanded.
    """
    output = Path(output).expanduser()
    resolved = output.resolve()
    for ref in inputs:
        p = Path(ref).expanduser()
        if p.exists() and is_within(p.resolve(), resolved):
            what = "is" if p.resolve() == resolved else "contains"
            raise LlmpruneError(f"output {output} {what} the input {ref}; choose another --output")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise LlmpruneError(f"output {output} already exists (pass --overwrite to replace it)")
        if not output.is_dir() or output.is_symlink():
            raise LlmpruneError(f"output {output} exists and is not a directory; refusing to replace it")
        protected = [Path.cwd().resolve(), Path.home().resolve()]
        if any(is_within(p, resolved) for p in protected) or resolved == Path(resolved.anchor):
            raise LlmpruneError(f"refusing to replace {output}: it is the current, home or root directory or "
                                "one of their ancestors")
        if not (output / METADATA_FILE).is_file():
            raise LlmpruneError(f"refusing to replace {output}: it is not an llmprune checkpoint "
                                f"(no {METADATA_FILE}); --overwrite only replaces llmprune's own outputs")
    _probe_writable(output)
    clean_leftovers(output)
    return output


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def move_into_place(src: Path, output: Path) -> None:
    """Move the finished directory ``src`` to ``output``, replacing an existing ``output`` atomically.

    Both are on one filesystem. With an existing ``output`` the two are exchanged in one step where the kernel
    supports it (the old checkpoint ends up in ``src`` and is deleted); otherwise the old one is renamed aside
    first, and deleted only after the new one is in place.
    """
    if not output.exists():
        os.replace(src, output)
        return
    if _exchange(src, output):
        shutil.rmtree(src, ignore_errors=True)
        return
    old = make_work_dir(output, "old")
    os.replace(output, old / "x")
    os.replace(src, output)
    shutil.rmtree(old, ignore_errors=True)
