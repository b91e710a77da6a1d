"""The ops as PyTorch sees them: every op in torch.ops.rome_fast passes torch.library.opcheck (schema
and mutation annotations, fake vs real outputs, AOT dispatch with dynamic shapes), the wrappers run
inside a torch.compile'd function without graph breaks, a missing core degrades as promised, and
setup.py's CUDA build is well formed. Numerics against the references: test_kernels.py and
test_solve_update.py."""
import runpy
from pathlib import Path

import pytest
import torch

from rome_fast import _ext, ops
from rome_fast.edit.solve_update import CovarianceFactor

ROOT = Path(__file__).resolve().parents[1]
needs_cpu_ext = pytest.mark.skipif(not _ext.cpu_ext_available(), reason="compiled core not built")
pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(4 * d, d, generator=g, dtype=torch.float64) + 0.3
    return K.T @ K / K.shape[0]


def _samples():
    """{op name: [(args, kwargs), ...]}: inputs for opcheck, covering each op's branches."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = {}
    out["add_noise_"] = [((r(4, 6, 8).to(dt), r(3, 2, 8), torch.tensor([0, 2, 3]),
                           torch.tensor([1, 0, 4]), torch.tensor([2, 1, 0])), {"replace": rep})
                         for dt, rep in ((torch.float32, False), (torch.bfloat16, True))]
    out["restore_rows_"] = [((r(5, 6, 8).to(dt), r(2, 6, 8).to(dt), torch.tensor([0, 1, 1, 0, 1]),
                              torch.tensor([0, -1, 5, 2, 3])), {})
                            for dt in (torch.float32, torch.float16)]
    out["rank_k_update_"] = [((r(12, 7).to(dt), r(shape_k, 3), r(shape_v, 3), layout), {})
                             for dt, layout, shape_k, shape_v in
                             ((torch.float32, "in_out", 12, 7), (torch.bfloat16, "out_in", 7, 12))]
    L = torch.linalg.cholesky(_spd(10))
    out["cholesky_solve"] = [((L, r(10, 3).double()), {}), ((L.float(), r(10, 1).double()), {})]
    out["normalize_dot"] = [((r(10, 3).double(), r(10, 3)), {}), ((r(10, 1), r(10, 1)), {})]
    C = _spd(12, seed=1)
    chol = CovarianceFactor(C).factor
    lu, piv = torch.linalg.lu_factor(C)
    kb = r(12, 2).abs()
    out["rome_update_"] = [
        ((r(12, 5), chol, kb[:, 0], kb[:, 0] + 0.1, r(5), "in_out"), {}),
        ((r(5, 12).half(), chol, kb, kb + 0.1, r(5, 2), "out_in"), {}),
        ((r(12, 5), lu, kb, kb + 0.1, r(5, 2), "in_out"),
         {"factor_kind": "lu", "pivots": piv.to(torch.int32)}),
    ]
    cos_sin = r(2, 5, 16)
    out["rope_heads"] = [((r(2, 5, 48), cos_sin.cos(), cos_sin.sin(), 3), {}),
                         ((r(2, 5, 32).bfloat16(), cos_sin[:1].cos().bfloat16(),
                           cos_sin[:1].sin().bfloat16(), 2), {})]
    return out


SAMPLES = _samples()


@needs_cpu_ext
def test_every_op_has_samples_and_a_fake():
    """A new op must come with opcheck samples here, and with a fake (rome_fast/ops)."""
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("rome_fast::")}
    assert registered == set(SAMPLES)
    for name in registered:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rome_fast::{name}", "Meta"), name


@needs_cpu_ext
@pytest.mark.parametrize("case", [pytest.param((name, i), id=f"{name}-{i}")
                                  for name, cases in SAMPLES.items() for i in range(len(cases))])
def test_opcheck(case):
    name, i = case
    args, kwargs = SAMPLES[name][i]
    torch.library.opcheck(getattr(torch.ops.rome_fast, name).default, args, kwargs)


@needs_cpu_ext
def test_opcheck_catches_an_undeclared_mutation():
    """opcheck is not vacuous here: the same call with W not marked as mutated fails it."""
    lib = torch.library.Library("rome_fast_test", "FRAGMENT")
    lib.define("rank_k_unmarked(Tensor W, Tensor U, Tensor R, str layout) -> ()")
    lib.impl("rank_k_unmarked", lambda W, U, R, layout: torch.ops.rome_fast.rank_k_update_(
        W, U, R, layout), "CPU")
    args, _ = SAMPLES["rank_k_update_"][0]
    with pytest.raises(Exception, match="mutat"):
        torch.library.opcheck(torch.ops.rome_fast_test.rank_k_unmarked.default, args)


@needs_cpu_ext
def test_compiled_function_calls_the_ops():
    """The wrappers of rome_fast.ops trace into one graph (fullgraph: no graph break) that calls
    the compiled ops, and the compiled function computes what the eager one does."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    B, T, H, hd = 3, 5, 2, 8
    x = torch.randn(B, T, H * hd, generator=g)
    clean = torch.randn(1, T, H * hd, generator=g)
    noise = torch.randn(2, 2, H * hd, generator=g)
    angle = torch.randn(1, T, hd, generator=g)
    W = torch.randn(12, H * hd, generator=g)
    fac = CovarianceFactor(_spd(12, seed=2))
    kbar = torch.rand(12, generator=g) + 0.1
    u, r = torch.randn(12, generator=g), torch.randn(H * hd, generator=g)

    def step(x, W):
        ops.add_noise_(x, noise, rows=[0, 2], starts=[1, 3])
        ops.restore_rows_(x, clean, 0, [2, -1, 4])
        q = ops.rope_heads(x, angle.cos(), angle.sin(), H)
        ops.rank_k_update_(W, u, r, "in_out")
        U, R = ops.rome_update_(W, fac, kbar, kbar + 0.1, q[0, 0, :, :].flatten()[: H * hd], "in_out")
        return q.sum(1), U, R

    want = step(x.clone(), W.clone())
    counter = CompileCounterWithBackend("aot_eager")
    x_c, W_c = x.clone(), W.clone()
    got = torch.compile(step, backend=counter, fullgraph=True)(x_c, W_c)
    assert counter.frame_count == 1
    called = {str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"}
    for name in ("add_noise_", "restore_rows_", "rope_heads", "rank_k_update_", "rome_update_"):
        assert f"rome_fast.{name}" in called, (name, sorted(called))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    W_want = W.clone()
    step(x.clone(), W_want)
    torch.testing.assert_close(W_c, W_want, rtol=0, atol=0)  # the in-place updates reached W


def test_missing_core_degrades_as_promised(monkeypatch):
    """Without the compiled core every wrapper runs its plain-PyTorch path, and asking for a
    native op by name is one clear error (rome_fast/_ext.py)."""
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "simulated")
    W = torch.randn(6, 4)
    u, r = torch.randn(6), torch.randn(4)
    torch.testing.assert_close(ops.rank_k_update_(W.clone(), u, r, "in_out"), W + torch.outer(u, r))
    x = torch.randn(2, 3, 4)
    assert torch.equal(ops.restore_rows_(x.clone(), x[1], 0, [1, -1])[0, 1], x[1, 1])
    assert not _ext.backend_info()["cpu_ext"]
    with pytest.raises(RuntimeError, match="compiled core is not available .*simulated.*rebuild"):
        ops.rank_k_update_(W, u, r, "in_out", use_native=True)
    fac = CovarianceFactor(_spd(6))
    with pytest.raises(RuntimeError, match="compiled core is not available"):
        ops.rome_update_(W, fac, u.abs(), u.abs(), r, "in_out", use_native=True)


def test_setup_cuda_build_is_well_formed(monkeypatch, tmp_path):
    """ROME_FAST_CUDA=1 against a CUDA torch: one extension with the CPU sources, the registration
    file and the kernels, setup.py's nvcc flags and the CUDA define on both compilers. (The CUDA
    side's compile is checked by scripts/check_cuda_compile.sh.)"""
    from torch.utils import cpp_extension as ce

    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    setup["_extensions"].__globals__["INFO_FILE"] = tmp_path / "_build_info.json"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("ROME_FAST_NO_EXT", raising=False)
    monkeypatch.setenv("ROME_FAST_CUDA", "1")
    monkeypatch.setenv("ROME_FAST_CUDA_ARCH", "90a")
    monkeypatch.chdir(ROOT)
    [ext], cmdclass = setup["_extensions"]()
    assert ext.name == "rome_fast._C" and "build_ext" in cmdclass
    srcs = set(ext.sources)
    assert {"csrc/module.cpp", "csrc/rome_update.cpp", "csrc/cpu/update_ops.cpp",
            "csrc/cuda/register.cpp", "csrc/cuda/update_kernels.cu"} <= srcs
    assert all((ROOT / s).is_file() for s in srcs)
    nvcc, cxx = ext.extra_compile_args["nvcc"], ext.extra_compile_args["cxx"]
    assert "--use_fast_math" in nvcc and "-gencode=arch=compute_90a,code=sm_90a" in nvcc
    assert "-DROME_FAST_WITH_CUDA" in nvcc and "-DROME_FAST_WITH_CUDA" in cxx
    assert '"cuda_ext": true' in (tmp_path / "_build_info.json").read_text()
    # and a CPU torch with ROME_FAST_CUDA=1 is a loud error, not a silent CPU build
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="ROME_FAST_CUDA=1 but the CUDA build is impossible"):
        setup["_extensions"]()
