"""Compile-level checks of the Triton kernels: what makes a memory-bound decode kernel fast, read off the cubin.

No GPU needed: every kernel is compiled ahead of time for sm_80 and sm_90 through its own launcher (config, grid,
arguments and JIT specialization are the launcher's; ``eval/kernel_compile.py``) at the Llama-3-8B decode shapes,
and the SASS of its main loop is inspected. Select with ``pytest -m compile``; ``eval/kernel_report.py`` prints
the same numbers as a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import kernel_compile as kc  # noqa: E402

pytestmark = pytest.mark.compile

ARCHS = (80, 90)
S24_LABELS = list(kc.SPARSE24_SHAPES)


def _jobs() -> list[tuple]:
    """Every compile this module checks, so the session fixture compiles them in one batch (two workers)."""
    jobs = []
    for arch in ARCHS:
        jobs += [kc.job("sparse24_linear", arch, n=n, k=k) for n, k in kc.SPARSE24_SHAPES.values()]
        jobs += [kc.job("sparse24_linear", arch, n=n, k=4128) for n in (4096, 1024)]
        jobs += [kc.job("sparse24_linear", arch, n=4096, k=4096, m=16)]
        jobs += [kc.job("kv_bitmap_attention", arch), kc.job("gated_attention", arch)]

        jobs += [kc.job("gated_attention", arch, d=128, block=256)]
    jobs += [kc.job("sparse24_linear", 90, n=14336, k=4096)]
    jobs += [kc.job("kv_bitmap_attention", 90, d=d) for d in (64, 256)] + [kc.job("kv_bitmap_attention", 90, version=1)]
    jobs += [kc.job("kv_bitmap_attention", 90, d=d, block_n=bn, dtype=dt) for d, bn, dt in KV_ESTIMATE_CASES]
    return jobs


KV_ESTIMATE_CASES = ((128, 32, torch.bfloat16), (128, 64, torch.bfloat16), (64, 64, torch.float32))


@pytest.fixture(scope="session")
def build():
    """``build(kind, arch, **params) -> list[Compiled]``; all of :func:`_jobs` compile once per session."""
    try:
        kc._bin("nvdisasm")
        kc._bin("cuobjdump")
        results = kc.compile_jobs(_jobs())
    except kc.CompileUnavailable as exc:
        pytest.skip(str(exc))

    def get(kind: str, arch: int, **params):
        jb = kc.job(kind, arch, **params)
        if jb not in results:
            results.update(kc.compile_jobs([jb]))
        res = results[jb]
        if isinstance(res, ValueError):
            raise res
        return res

    return get


def _threads(c) -> int:
    return 32 * c.num_warps


def _common(c, arch):
    """No spills, shared memory within the architecture's limit."""
    assert c.local_bytes == 0 and c.spill_ops == 0, f"{c.name}: {c.local_bytes} B local memory, {c.spill_ops} spill ops"
    assert c.regs <= 255
    assert c.shared <= kc.SMEM_LIMIT[arch], f"{c.name}: {c.shared} B shared > sm_{arch} limit"


# --------------------------------------------------------------------------- 2:4 linear


def _s24_value_bytes_per_thread(c) -> int:
    k = c.constexprs
    return k["BLOCK_N"] * 2 * k["BLOCK_G"] * 2 // _threads(c)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label", S24_LABELS)
def test_sparse24_decode_main_loop(build, label, arch):
    n, k = kc.SPARSE24_SHAPES[label]
    launches = build("sparse24_linear", arch, n=n, k=k)
    assert len(launches) == 1, f"{[c.name for c in launches]}: one launch per call"
    c = launches[0]
    _common(c, arch)
    loop = c.main_loop
    assert loop is not None
    assert loop.count("SHFL") == 0, "cross-lane reduction inside the M=1 main loop"
    assert loop.count("BAR") <= 2
    need = _s24_value_bytes_per_thread(c) // 16
    assert loop.vector_loads(128) >= need, f"values stream not in 16-byte vectors: {loop.global_loads()}"
    assert loop.narrow_loads(32) == 0, f"sub-word global loads in the main loop: {loop.global_loads()}"
    assert loop.count("LDGSTS") >= need, f"main-loop loads are not pipelined (cp.async): {loop.global_loads()}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n,k", [(4096, 4128), (1024, 4128)])  # K/4 not a multiple of the block (tail); split-K
def test_sparse24_vectorization_does_not_depend_on_the_tail(build, n, k, arch):
    (c,) = build("sparse24_linear", arch, n=n, k=k)
    _common(c, arch)
    assert c.main_loop.vector_loads(128) >= _s24_value_bytes_per_thread(c) // 16
    assert c.main_loop.count("SHFL") == 0
    if n == 1024:
        assert c.constexprs["SPLIT_K"] > 1  # split-K, still one launch (in-kernel finish)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse24_tensor_core_path(build, arch):
    (c,) = build("sparse24_linear", arch, n=4096, k=4096, m=16)
    _common(c, arch)
    loop = c.main_loop
    assert loop.count("HMMA") > 0 and loop.count("LDGSTS") > 0
    assert loop.vector_loads(128) >= _s24_value_bytes_per_thread(c) // 16


def test_sparse24_shared_estimate_bounds_the_compiled_kernel(build):
    mod = kc.aot_module("sparse24_linear")
    for params in (dict(n=4096, k=4096), dict(n=14336, k=4096), dict(n=4096, k=4096, m=16)):
        (c,) = build("sparse24_linear", 90, **params)
        cfg = mod.sparse24_config(params.get("m", 1), params["n"], params["k"], num_sms=132)
        assert c.shared <= mod.shared_bytes(cfg), (params, c.shared)


# --------------------------------------------------------------------------- bitmap-KV attention


def _kv_value_bytes_per_thread(c) -> int:
    """Bytes of K and V values one thread streams per main-loop iteration (70%: 38 of 128 kept)."""
    keep = kc.kv_bitmap_layout(kc.ATTN["context"], 0.7, d=c.constexprs["D"])["keep"]
    return 2 * c.constexprs["BLOCK_N"] * keep * 2 // _threads(c)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_bitmap_decode(build, arch):
    launches = build("kv_bitmap_attention", arch)
    assert len(launches) == 1, "the split combine runs in the same launch"
    c = launches[0]
    _common(c, arch)
    assert c.ctas_per_sm_regs >= 2, f"{c.regs} registers x {c.num_warps} warps: < 2 CTAs/SM"
    assert c.constexprs["K_KEEP"] > 0 and c.constexprs["V_KEEP"] > 0, "format 2: offsets derived, not loaded"
    loop = c.main_loop
    tokens = c.constexprs["BLOCK_N"]
    assert loop.count("SHFL") <= tokens // 2, "ranks come from popcounts, not a cross-lane prefix sum"
    assert loop.count("BAR") <= 16, "one barrier pair per operand, not one per dependent load"


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_bitmap_value_stream_is_vectorized_and_pipelined(build, arch):
    """Format 2: each block's values are one contiguous run, loaded as 16-byte cp.async vectors (no 2-byte
    gathers from global memory), pipelined across iterations; the expansion costs a bounded number of SASS per
    dense element (the old per-value gather design: ~22)."""
    (c,) = build("kv_bitmap_attention", arch)
    loop = c.main_loop
    need = _kv_value_bytes_per_thread(c) // 16
    assert loop.vector_loads(128) >= need, f"values not in 16-byte vectors: {loop.global_loads()}"
    assert loop.narrow_loads(32) == 0, f"sub-word global loads in the main loop: {loop.global_loads()}"
    assert loop.count("LDGSTS", "UTMALDG") >= need, f"main-loop loads are not pipelined: {loop.global_loads()}"
    dense_per_thread = 2 * c.constexprs["BLOCK_N"] * c.constexprs["D"] // _threads(c)
    assert loop.size / dense_per_thread <= 7, f"{loop.size} SASS for {dense_per_thread} dense elements per thread"


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_bitmap_expands_two_elements_per_shared_load(build, arch):
    """16-bit values expand in pairs: one 32-bit shared-memory load, one PRMT and one AND per two dense elements
    (the single-element path: one 16-bit load per element)."""
    (c,) = build("kv_bitmap_attention", arch)
    assert c.constexprs["K_PAIRS"] and c.constexprs["V_PAIRS"]
    loop = c.main_loop
    pairs_per_thread = c.constexprs["BLOCK_N"] * c.constexprs["D"] // _threads(c)  # K and V: 2 x dense / 2
    assert loop.count("LDS.U16") == 0, "a 16-bit shared load per element: the pair path is not in the main loop"
    assert pairs_per_thread <= loop.count("PRMT") <= pairs_per_thread + 8, loop.count("PRMT")
    lds32 = loop.opcodes.get("LDS", 0)  # plain 32-bit shared loads (not .128, .64 or ldmatrix)
    assert pairs_per_thread <= lds32 <= pairs_per_thread * 5 // 4, f"{lds32} 32-bit shared loads, {pairs_per_thread} pairs"


@pytest.mark.parametrize("arch", [90])
def test_kv_bitmap_version1_rows_still_compile(build, arch):
    """Stored offsets (per-head keep counts share one values buffer): the general path, no spills."""
    launches = build("kv_bitmap_attention", arch, version=1)
    assert len(launches) == 1 and launches[0].constexprs["K_KEEP"] == 0
    _common(launches[0], arch)


def test_kv_bitmap_shared_estimate_bounds_the_compiled_kernel(build):
    mod = kc.aot_module("kv_bitmap_attention")
    for d, bn, dtype in KV_ESTIMATE_CASES:
        (c,) = build("kv_bitmap_attention", 90, d=d, block_n=bn, dtype=dtype)
        lay = kc.kv_bitmap_layout(kc.ATTN["context"], 0.7, d=d)
        cfg = mod.kv_bitmap_config(1, 8, 4, 1, lay["n_compressed"], d, num_sms=132, block_n=bn, k_keep=lay["keep"],
                                   v_keep=lay["keep"])
        assert c.shared <= mod.shared_bytes(cfg, torch.empty(0, dtype=dtype).element_size()), (d, bn, dtype)


@pytest.mark.parametrize("d", [64, 256])
def test_kv_bitmap_other_head_dims(build, d):
    """The default configs at head_dim 64 and 256: no spills, 16-byte value loads; 2 CTAs/SM at 64 (at 256 the
    8-warp config holds one: with 4 warps it would need more than 255 registers per thread and spill)."""
    (c,) = build("kv_bitmap_attention", 90, d=d)
    _common(c, 90)
    assert c.ctas_per_sm_regs >= (2 if d <= 128 else 1)
    assert c.main_loop.narrow_loads(32) == 0 and c.main_loop.vector_loads(128) > 0
    if d == 64:  # 2 warps: every thread expands its own elements (4 warps repeated half of them: ~14.6 per element)
        dense_per_thread = 2 * c.constexprs["BLOCK_N"] * d // _threads(c)
        assert c.main_loop.size / dense_per_thread <= 9, f"{c.main_loop.size} SASS, {dense_per_thread} elements"


# --------------------------------------------------------------------------- gated attention


@pytest.mark.parametrize("arch", ARCHS)
def test_gated_decode(build, arch):
    launches = build("gated_attention", arch)
    assert len(launches) == 1, "the split combine runs in the same launch"
    c = launches[0]
    _common(c, arch)
    loop = c.main_loop
    kv_bytes = 2 * c.constexprs["BLOCK_N"] * c.constexprs["HEAD_D"] * 2 // _threads(c)
    assert loop.vector_loads(128) * 16 >= kv_bytes, f"K/V not in 16-byte vectors: {loop.global_loads()}"
    assert loop.count("LDGSTS") * 16 >= kv_bytes, "K/V loads are not pipelined (cp.async)"
    assert c.shared <= kc.aot_module("gated_attention").shared_bytes(dict(c.constexprs, num_stages=c.num_stages), 2)
    # one split per two selected blocks at the benchmark point (90% skipped, 32k), shared evenly: none is empty
    selected = max(2, round(0.1 * kc.ATTN["context"] / 64))
    assert 2 * c.constexprs["NUM_SPLITS"] <= selected + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_gated_big_blocks_fall_back_to_two_stages(build, arch):
    (c,) = build("gated_attention", arch, d=128, block=256)
    _common(c, arch)
    assert c.num_stages == 2
    assert c.shared <= kc.aot_module("gated_attention").shared_bytes(dict(c.constexprs, num_stages=2), 2)


# --------------------------------------------------------------------------- configs the GPU cannot run


@pytest.mark.parametrize("kind,params", [
    ("kv_bitmap_attention", dict(d=256, block_n=128)),                       # 274 KB with bf16
    ("kv_bitmap_attention", dict(d=128, block_n=128, dtype=torch.float32)),  # fp32 tiles
    ("gated_attention", dict(d=256, block=256)),  # 278 KB even double-buffered
])
@pytest.mark.parametrize("arch", ARCHS)
def test_launchers_refuse_what_the_architecture_cannot_run(kind, params, arch):
    call = kc.kv_bitmap_call(**params) if kind == "kv_bitmap_attention" else kc.gated_call(**params)
    with pytest.raises(ValueError, match="shared memory"):
        kc.capture(kind, call, arch)


def test_launchers_reject_bad_block_sizes():
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        kc.capture("kv_bitmap_attention", kc.kv_bitmap_call(block_n=48), 90)
    mod = kc.aot_module("sparse24_linear")
    big = dict(mod.sparse24_config(1, 4096, 4096, num_sms=132), BLOCK_N=256, BLOCK_G=512)
    with pytest.raises(ValueError, match="shared memory"):
        mod.check_config(big, 80)
