"""Compile llmprune's Triton kernels ahead of time, without a GPU, exactly as their launchers would launch them.

Triton compiles for any NVIDIA target on a machine with no GPU: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` gives TTGIR, PTX and a cubin, and the wheel bundles ``cuobjdump`` and
``nvdisasm`` to read the cubin back. This module

* loads a private copy of a kernel module (``kernels/<name>.py``) with ``TRITON_INTERPRET`` off, so its
  ``@triton.jit`` functions are real JIT functions even inside a test session that interprets the kernels, and
  with its ``device_info`` stubbed to report the target (SM count, compute capability);
* calls the module's own launcher on ``meta`` tensors (shapes, strides and dtypes, no storage) with every
  ``*_kernel`` replaced by a recorder, so the config, grid, arguments and JIT specialization (divisibility by
  16, ``== 1`` constants) are the launcher's own;
* compiles each recorded launch through Triton's own binder for the target and reads off registers, spills,
  shared memory, the SASS of the main loop (the largest loop between a label and its backward branch) and the
  width of its global loads.

Used by ``tests/kernels/test_compiled.py`` (``pytest -m compile``) and ``eval/kernel_report.py``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"

#: Targets: compute capability -> (name, SMs, boost clock GHz, HBM TB/s) of the reference GPU (A100 / H100 SXM).
ARCHS = {80: ("sm_80", 108, 1.41, 2.04), 90: ("sm_90", 132, 1.98, 3.35)}
#: Shared memory one block may use (bytes), the launchers' limit too (kernels/_device.py).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: Warp schedulers per SM: the SM issues at most this many warp instructions per cycle.
ISSUE_PER_CYCLE = 4


class CompileUnavailable(RuntimeError):
    """Triton's NVIDIA backend or its bundled binutils are missing (e.g. a Triton wheel without CUDA support)."""


def _bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.is_file():
        raise CompileUnavailable(f"{tool} is not bundled with this Triton ({path})")
    return str(path)


# --------------------------------------------------------------------------- capture launches


@dataclass
class Launch:
    """One kernel launch as the launcher made it."""

    kernel: object  # triton.runtime.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return record


@contextlib.contextmanager
def _compiling():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def aot_module(name: str, path: str | None = None):
    """A private copy of ``kernels/<name>.py`` (or ``path``) whose ``@triton.jit`` functions compile (not interpret)."""
    return _aot_module(name, None if path is None else str(path))


@functools.cache
def _aot_module(name: str, path: str | None):
    import triton

    file = Path(path) if path else KERNEL_DIR / f"{name}.py"
    with _compiling():  # @triton.jit reads TRITON_INTERPRET when the module loads
        tag = "" if path is None else f"_{abs(hash(str(file))) % 10**8}"
        spec = importlib.util.spec_from_file_location(f"llmprune.kernels._aot_{name}{tag}", file)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "llmprune.kernels"  # relative imports (kernels/_device.py) resolve in the real package
        spec.loader.exec_module(mod)
    mod._aot_kernels = {k: v for k, v in vars(mod).items()
                        if isinstance(v, triton.runtime.JITFunction) and k.endswith("_kernel")}
    if not mod._aot_kernels:
        raise RuntimeError(f"{file}: no @triton.jit *_kernel found (loaded interpreted?)")
    return mod


def capture(name: str, call, arch: int, *, path: str | None = None, patch=None) -> list[Launch]:
    """Run ``call(module)`` (which calls the launcher on meta tensors) and return the launches it made.

    ``patch(module, sms, arch)``: optional extra stubbing (older kernel files without ``device_info``).
    """
    mod = aot_module(name, path)
    sms = ARCHS[arch][1]
    sink: list[Launch] = []
    saved = dict(vars(mod))
    try:
        for k, v in mod._aot_kernels.items():
            setattr(mod, k, _Recorder(v, sink))
        if hasattr(mod, "device_info"):
            mod.device_info = lambda device: (sms, arch)
        if patch is not None:
            patch(mod, sms, arch)
        call(mod)
    finally:
        for k in list(vars(mod)):
            if k not in saved:
                delattr(mod, k)
        for k, v in saved.items():
            setattr(mod, k, v)
    return sink


# --------------------------------------------------------------------------- compile and read back


@dataclass
class Loop:
    """A loop of the SASS: the instructions from a label to the backward branch that jumps to it."""

    start: int
    end: int
    instructions: list[str]

    @property
    def size(self) -> int:
        return len(self.instructions)

    @functools.cached_property
    def opcodes(self) -> collections.Counter:
        return collections.Counter(_opcode(t) for t in self.instructions)

    def count(self, *prefixes: str) -> int:
        """Instructions whose opcode starts with any of ``prefixes`` (``"SHFL"``, ``"LDG."``, ...)."""
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefixes))

    def global_loads(self) -> dict[str, collections.Counter]:
        """``{"LDG": {bits: count}, "LDGSTS": {...}, "TMA": {...}}`` of the loop's global loads."""
        out = {"LDG": collections.Counter(), "LDGSTS": collections.Counter(), "TMA": collections.Counter()}
        for op, n in self.opcodes.items():
            parts = op.split(".")
            if parts[0] in ("LDG", "LDGSTS"):
                out[parts[0]][_width(parts[1:])] += n
            elif parts[0] in ("UTMALDG", "UBLKCP"):
                out["TMA"][0] += n
        return out

    def vector_loads(self, bits: int = 128) -> int:
        """Global loads (plain or cp.async) of ``bits``-wide vectors in the loop."""
        g = self.global_loads()
        return g["LDG"][bits] + g["LDGSTS"][bits]

    def narrow_loads(self, below_bits: int = 32) -> int:
        g = self.global_loads()
        return sum(n for kind in ("LDG", "LDGSTS") for w, n in g[kind].items() if w < below_bits)


def _opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P[T\d]+\s+", "", text.strip())
    return text.split()[0] if text else ""


_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _width(mods: list[str]) -> int:
    for m in mods:
        if m in _WIDTHS:
            return _WIDTHS[m]
    return 32


def parse_sass(text: str) -> tuple[list[tuple[int, str]], list[Loop]]:
    """``nvdisasm`` output -> (instructions ``(address, text)``, loops found by their backward branches)."""
    labels: dict[str, int] = {}
    pending: list[str] = []
    ins: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            ins.append((addr, m.group(2)))
    loops = []
    for addr, t in ins:
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", t)
        if m and m.group(1) in labels and labels[m.group(1)] < addr:
            lo = labels[m.group(1)]
            loops.append(Loop(lo, addr, [x for a, x in ins if lo <= a <= addr]))
    return ins, loops


@dataclass
class Compiled:
    """What one launch compiles to on one target."""

    name: str
    arch: int
    grid: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int
    local_bytes: int
    shared: int
    ptx: str
    sass: str
    loops: list[Loop] = field(repr=False)

    @property
    def spill_ops(self) -> int:
        return sum(1 for line in self.sass.splitlines() if re.search(r"\b(STL|LDL)\b", line))

    @property
    def main_loop(self) -> Loop | None:
        """The largest loop (the kernels' streaming loops; tiny loops such as the trailing ``BRA`` self-loop lose)."""
        loops = [lp for lp in self.loops if lp.size >= 8]
        return max(loops, key=lambda lp: lp.size) if loops else None

    @property
    def ctas_per_sm_regs(self) -> int:
        """Blocks per SM the register file allows (64K registers, allocated per warp in units of 256)."""
        per_warp = -(-max(self.regs, 1) * 32 // 256) * 256
        return max(0, 65536 // (per_warp * self.num_warps))


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile ``launch`` for ``sm_<arch>`` through Triton's binder (same signature, constants and attributes)."""
    key = (launch.kernel.fn.__module__, launch.name, arch, _launch_key(launch))
    hit = _CACHE.get(key)
    if hit is not None:
        return Compiled(**{**hit.__dict__, "grid": launch.grid})
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:  # pragma: no cover - depends on the Triton build
        raise CompileUnavailable(f"this Triton cannot compile ahead of time: {exc}") from exc

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
    except Exception as exc:  # noqa: BLE001 - no NVIDIA backend in this wheel
        raise CompileUnavailable(f"no NVIDIA backend in this Triton: {exc}") from exc
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    with _compiling():  # Triton's language builtins switch to the interpreter while TRITON_INTERPRET is set
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    cubin = kernel.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(f)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), "-c", str(f)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
    _, loops = parse_sass(sass)
    const = {k: v for k, v in launch.kwargs.items() if k.isupper()}
    out = Compiled(
        name=launch.name, arch=arch, grid=launch.grid, constexprs=const,
        num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
        regs=int(m.group(1)), local_bytes=int(m.group(2)), shared=int(kernel.metadata.shared),
        ptx=kernel.asm["ptx"], sass=sass, loops=loops,
    )  # fmt: skip
    _CACHE[key] = out
    return out


_CACHE: dict[tuple, Compiled] = {}


def _launch_key(launch: Launch) -> tuple:
    """What the JIT specializes on: dtypes, 16-byte alignment, ints (value classes), constexprs."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return ("t", str(a.dtype))
        if isinstance(a, bool) or a is None:
            return a
        if isinstance(a, int):
            return ("i", a == 1, a % 16 == 0, abs(a) >= 2**31)
        if isinstance(a, float):
            return "f"
        return repr(a)

    return tuple(one(a) for a in launch.args) + tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items()))


def compile_call(name: str, call, arch: int, **kw) -> list[Compiled]:
    """:func:`capture` then :func:`compile_launch` every launch."""
    return [compile_launch(lc, arch) for lc in capture(name, call, arch, **kw)]


# --------------------------------------------------------------------------- the benchmark shapes

#: Llama-3-8B linears at decode, ``(N, K)`` = (out, in): q/o_proj, gate/up_proj, down_proj, fused q|k|v.
SPARSE24_SHAPES = {"q/o_proj 4096x4096": (4096, 4096), "gate/up_proj 14336x4096": (14336, 4096),
                   "down_proj 4096x14336": (4096, 14336), "fused qkv 6144x4096": (6144, 4096)}
#: Llama-3-8B attention at decode: batch 1, 32 query heads, 8 KV heads, head dim 128, 32k context.
ATTN = dict(batch=1, hq=32, hkv=8, d=128, context=32768)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def sparse24_call(n: int, k: int, m: int = 1, dtype=torch.bfloat16):
    def call(mod):
        mod.sparse24_linear(meta(m, k, dtype=dtype), meta(n, k // 2, dtype=dtype),
                            meta(n, (k // 2 + 15) // 16, dtype=torch.int32))

    return call


def kv_bitmap_layout(context: int, sparsity: float, window: int = 32, d: int = 128) -> dict:
    """Token counts, keep count and metadata bytes per tile (format 2) of the bitmap cache at ``context`` tokens."""
    from llmprune.formats.bitmap import TILE_WORD_BYTES, keep_count

    return dict(n_compressed=context - window, window=window, keep=keep_count(d, sparsity), tiles=d // 64,
                meta=TILE_WORD_BYTES)


def kv_bitmap_call(sparsity: float = 0.7, dtype=torch.bfloat16, block_n: int | None = None, version: int = 2,
                   **shape):
    """The bitmap-KV launcher on a cache of ``context`` tokens: format-2 rows (bitmap + values, offsets derived;
    what the cache writes with one keep count per head) or, ``version=1``, with stored offsets."""
    s = {**ATTN, **shape}
    lay = kv_bitmap_layout(s["context"], sparsity, d=s["d"])
    B, H, d, tc, w = s["batch"], s["hkv"], s["d"], lay["n_compressed"], lay["window"]

    def call(mod):
        nt = tc * d // 64
        offsets = meta(B, H, nt, dtype=torch.int32) if version == 1 else None
        rows = [meta(B, H, nt, dtype=torch.int64), offsets, meta(B, H, tc * lay["keep"], dtype=dtype)]
        kw = {} if block_n is None else {"block_n": block_n}
        mod.kv_bitmap_attention(meta(B, s["hq"], 1, d, dtype=dtype), *rows, *rows, meta(B, H, w, d, dtype=dtype),
                                meta(B, H, w, d, dtype=dtype), tc, **kw)

    return call


def gated_call(keep: float = 0.1, block: int = 64, dtype=torch.bfloat16, **shape):
    s = {**ATTN, **shape}
    B, H, d, L = s["batch"], s["hkv"], s["d"], s["context"]
    nb = -(-L // block)
    n = max(2, round(keep * nb))

    def call(mod):
        mod.gated_attention(meta(B, s["hq"], d, dtype=dtype), meta(B, H, L, d, dtype=dtype),
                            meta(B, H, L, d, dtype=dtype), meta(B, H, n, dtype=torch.int32), block,
                            counts=meta(B, H, dtype=torch.int32))

    return call


def act_sparse_call(n: int, k: int, m: int = 1, dtype=torch.bfloat16):
    """The input-sparse GEMV on ``x [m, k] @ W^T [k, n]`` (the threshold is a runtime scalar)."""
    def call(mod):
        mod.act_sparse_gemv(meta(m, k, dtype=dtype), meta(k, n, dtype=dtype), 0.5)

    return call


# --------------------------------------------------------------------------- jobs (in process, or in workers)

CALLS = {"sparse24_linear": sparse24_call, "kv_bitmap_attention": kv_bitmap_call, "gated_attention": gated_call,
         "act_sparse_gemv": act_sparse_call}


def job(kind: str, arch: int, **params) -> tuple:
    """A hashable, picklable compile job: ``kind`` (kernel module), target, launcher-call parameters."""
    return (kind, arch, tuple(sorted(params.items())))


def run_job(jb: tuple) -> list[Compiled] | ValueError:
    """Compile one job; a launcher's refusal (``ValueError``) is returned, not raised."""
    kind, arch, params = jb
    try:
        return compile_call(kind, CALLS[kind](**dict(params)), arch)
    except ValueError as exc:
        return exc


def in_process_ok() -> bool:
    """Whether this process can compile: Triton's own ``@jit`` library (``tl.zeros``, ``tl.sum``, ...) was built
    compiled, not interpreted (it is decided once, when ``triton.language`` is first imported)."""
    import triton
    import triton.language as tl

    return isinstance(tl.zeros, triton.runtime.JITFunction) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def compile_jobs(jobs, workers: int | None = None) -> dict:
    """``{job: list[Compiled] | ValueError}``: in this process when it can compile, else in ``workers`` fresh
    interpreter-free subprocesses (``TRITON_INTERPRET`` unset) that split the jobs between them."""
    jobs = list(dict.fromkeys(jobs))
    if in_process_ok():
        return {jb: run_job(jb) for jb in jobs}
    workers = max(1, min(workers or os.cpu_count() or 1, 2, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(workers):
            part = jobs[w::workers]
            src, dst = Path(tmp) / f"in{w}.pkl", Path(tmp) / f"out{w}.pkl"
            src.write_bytes(pickle.dumps(part))
            procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(src), str(dst)], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), dst))
        out: dict = {}
        for proc, dst in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                if "CompileUnavailable" in err:
                    raise CompileUnavailable(err.strip().splitlines()[-1])
                raise RuntimeError(f"compile worker failed ({proc.returncode}):\n{err[-4000:]}")
            out.update(pickle.loads(dst.read_bytes()))
    return out


def _light_package() -> None:
    """In a worker: make ``llmprune`` a bare namespace over its folder, so the byte layouts the kernels import load
    without ``llmprune/__init__.py`` (which registers the built-ins and imports transformers: seconds per worker)."""
    import types

    if "llmprune" in sys.modules:
        return
    for name, folder in (("llmprune", ROOT / "llmprune"), ("llmprune.kernels", KERNEL_DIR)):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg


def _worker(src: str, dst: str) -> None:
    _light_package()
    jobs = pickle.loads(Path(src).read_bytes())
    Path(dst).write_bytes(pickle.dumps({jb: run_job(jb) for jb in jobs}))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    import kernel_compile  # this file under its module name, so results unpickle as kernel_compile.Compiled

    kernel_compile._worker(sys.argv[2], sys.argv[3])
