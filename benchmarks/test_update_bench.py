"""Micro-benchmarks of the ROME solve + weight update: the fused compiled call against the
reference's arithmetic, cached (C⁻¹ kept per layer: matvec + outer product + add) and uncached
(torch.inverse every call), at GPT-2 XL's c_proj (d_k 6400, d_v 1600) and the embedded model's
down_proj (1536, 576), CPU fp32. The rank-1 kernel alone is compared with the time to read and write
W once at this machine's copy bandwidth (measured with a large `Tensor.copy_`, and at W's own size,
which may sit in cache).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_update_bench.py \
        --benchmark-json benchmarks/results/update_cpu.json
"""
import time

import pytest
import torch

from rome_fast import _ext
from rome_fast.edit import solve_update as su

SHAPES = {"gpt2-xl": (6400, 1600, "in_out"), "smollm2-135m": (1536, 576, "out_in")}
needs_ext = pytest.mark.skipif(not _ext.cpu_ext_available(), reason="compiled core not built")


def _copy_bandwidth(nbytes: int, reps: int = 7) -> float:
    """Best-of-reps bytes moved per second (read + write) by `dst.copy_(src)` of `nbytes` each."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


@pytest.fixture(scope="module")
def dram_bw():
    # 2 × 1 GiB: larger than this machine's last-level cache, so this is memory bandwidth.
    return _copy_bandwidth(1 << 30, reps=5)


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request):
    d_k, d_v, layout = SHAPES[request.param]
    g = torch.Generator().manual_seed(0)
    # SPD with a spread spectrum, built cheaply (identity + low rank): the solve's cost does not
    # depend on the values.
    G = torch.randn(d_k, 64, generator=g, dtype=torch.float64) / 8
    C = torch.eye(d_k, dtype=torch.float64) * 0.05 + G @ G.T
    kbar = torch.rand(d_k, generator=g)
    kstar = kbar + 0.1 * torch.randn(d_k, generator=g)
    resid = torch.randn(d_v, generator=g)
    shape = (d_k, d_v) if layout == "in_out" else (d_v, d_k)
    W = torch.randn(shape, generator=g)
    return dict(name=request.param, C=C, C32=C.float(), layout=layout, kbar=kbar, kstar=kstar,
                resid=resid, W=W, d_k=d_k, d_v=d_v)


@pytest.fixture(scope="module")
def factors(case):
    return {"fp64": su.CovarianceFactor(case["C"]),
            "fp32": su.CovarianceFactor(case["C"], dtype=torch.float32)}


def _record(benchmark, case, bw, extra=None):
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable
        return
    nbytes = 2 * case["W"].numel() * case["W"].element_size()
    med = benchmark.stats.stats.median
    info = {"shape": case["name"], "d_k": case["d_k"], "d_v": case["d_v"],
            "threads": torch.get_num_threads(), "W_read_write_bytes": nbytes,
            "achieved_W_GBps": nbytes / med / 1e9}
    info.update(bw)
    info.update(extra or {})
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="update-fused-vs-reference")
@needs_ext
@pytest.mark.parametrize("factor_dtype", ["fp64", "fp32"])
def test_fused_update(benchmark, case, factors, factor_dtype, dram_bw):
    """One edit, everything per edit: solve with the cached factor, normalise, divide, W += u ⊗ r."""
    W, fac = case["W"], factors[factor_dtype]
    benchmark(su.rome_update_, W, fac, case["kbar"], case["kstar"], case["resid"], case["layout"])
    _record(benchmark, case, {"dram_GBps": dram_bw / 1e9},
            {"factor_bytes_read_per_solve": fac.factor.numel() * fac.factor.element_size()})


@pytest.mark.benchmark(group="update-fused-vs-reference")
def test_reference_cached_inverse(benchmark, case, dram_bw):
    """The reference with C⁻¹ cached per (model, layer): matvec + outer product + add."""
    C_inv = torch.inverse(case["C32"])
    benchmark(su.rome_update_ref, case["W"], None, case["kbar"], case["kstar"], case["resid"],
              case["layout"], C_inv)
    _record(benchmark, case, {"dram_GBps": dram_bw / 1e9})


@pytest.mark.benchmark(group="update-uncached")
def test_reference_uncached_inverse(benchmark, case):
    """The reference's first edit of a layer: torch.inverse(C) in fp32, then as above."""
    benchmark.pedantic(su.rome_update_ref, args=(case["W"], case["C32"], case["kbar"], case["kstar"],
                                                 case["resid"], case["layout"]),
                       rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="update-uncached")
@needs_ext
def test_fused_uncached_factor(benchmark, case):
    """Our first edit of a layer: float64 Cholesky of C, then the fused call."""
    def first_edit():
        fac = su.CovarianceFactor(case["C"])
        return su.rome_update_(case["W"], fac, case["kbar"], case["kstar"], case["resid"],
                               case["layout"])
    benchmark.pedantic(first_edit, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="rank1-update-only")
@needs_ext
def test_rank1_kernel(benchmark, case, dram_bw):
    """W += u ⊗ r alone: the memory-bound part, against reading + writing W once."""
    W = case["W"]
    u = torch.randn(case["d_k"], 1)
    r = torch.randn(case["d_v"], 1)
    same_size_bw = _copy_bandwidth(W.numel() * 4)
    benchmark(torch.ops.rome_fast.rank_k_update_, W, u, r, case["layout"])
    nbytes = 2 * W.numel() * 4
    _record(benchmark, case, {"dram_GBps": dram_bw / 1e9, "copy_GBps_at_W_size": same_size_bw / 1e9},
            {"W_rw_ms_at_dram_bw": nbytes / dram_bw * 1e3,
             "W_rw_ms_at_copy_bw_W_size": nbytes / same_size_bw * 1e3})


@pytest.mark.benchmark(group="rank1-update-only")
def test_reference_outer_add(benchmark, case, dram_bw):
    """The reference's update step alone: materialise u.unsqueeze(1) @ r.unsqueeze(0), then add."""
    W = case["W"]
    u, r = torch.randn(case["d_k"]), torch.randn(case["d_v"])

    def outer_add():
        upd = u.unsqueeze(1) @ r.unsqueeze(0)
        W[...] += upd if case["layout"] == "in_out" else upd.T

    benchmark(outer_add)
    _record(benchmark, case, {"dram_GBps": dram_bw / 1e9})


@pytest.mark.benchmark(group="batch-16-edits")
@needs_ext
def test_fused_batch16(benchmark, case, factors):
    """16 edits as one rank-16 update (one solve with 16 right-hand sides, one pass over W)."""
    n = 16
    g = torch.Generator().manual_seed(2)
    kbar = torch.rand(case["d_k"], n, generator=g)
    kstar = kbar + 0.1 * torch.randn(case["d_k"], n, generator=g)
    resid = torch.randn(case["d_v"], n, generator=g)
    benchmark(su.rome_update_, case["W"], factors["fp64"], kbar, kstar, resid, case["layout"])


@pytest.mark.benchmark(group="batch-16-edits")
def test_reference_16_sequential_cached(benchmark, case):
    """The reference applying 16 edits one after another with a cached C⁻¹."""
    n = 16
    g = torch.Generator().manual_seed(2)
    kbar = torch.rand(case["d_k"], n, generator=g)
    kstar = kbar + 0.1 * torch.randn(case["d_k"], n, generator=g)
    resid = torch.randn(case["d_v"], n, generator=g)
    C_inv = torch.inverse(case["C32"])
    benchmark(su.rome_update_ref, case["W"], None, kbar, kstar, resid, case["layout"], C_inv)
