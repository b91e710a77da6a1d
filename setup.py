"""Build rome_fast's compiled core (its ops and how they are checked: docs/kernels.md).

The C++ (CPU) core is always attempted; the CUDA kernels are added where torch has CUDA and nvcc is
found. Environment switches (as flash-attention / xformers do):

  ROME_FAST_CUDA=auto|1|0   auto (default): CUDA when possible; 1: force (fail loudly); 0: skip
  ROME_FAST_NO_EXT=1        build nothing: the package runs on its plain-PyTorch path
  ROME_FAST_CUDA_ARCH="90a;80"  compute capabilities for nvcc (default: 80;90 + the local GPU's)
  MAX_JOBS=N                ninja parallelism

A failed compile is a warning, not a failed install: `rome_fast.backend_info()` then says why (and
the test suite fails unless ROME_FAST_NO_EXT=1, see tests/conftest.py).
Install with `pip install --no-build-isolation -e .` so the extension is built against your torch.
"""
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).parent
INFO_FILE = ROOT / "rome_fast" / "_build_info.json"

# The compiler flags, one list each: scripts/check_cuda_compile.sh reads them from here.
CXX_FLAGS = ["-O3", "-std=c++20"] + (["-fopenmp"] if sys.platform != "darwin" else [])
LD_FLAGS = ["-fopenmp"] if sys.platform != "darwin" else []
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]
CUDA_DEFINE = "-DROME_FAST_WITH_CUDA"
DEFAULT_CUDA_ARCHS = "80;90"


def gencode_flags(archs: str) -> list:
    """nvcc -gencode flags for a ';'- or ','-separated list of compute capabilities ("80;90a")."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}"
            for a in sorted(set(archs.replace(",", ";").split(";"))) if a]


def sources():
    """(CPU sources, CUDA-only sources), relative to the repository root."""
    def rel(pattern):
        return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    return rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp"), rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")


def _write_info(**info):
    INFO_FILE.write_text(json.dumps(info, indent=1))


def _extensions():
    if os.environ.get("ROME_FAST_NO_EXT", "0") == "1":
        _write_info(cpu_ext=False, cuda_ext=False, note="ROME_FAST_NO_EXT=1 at build time")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        _write_info(cpu_ext=False, cuda_ext=False, note="torch was not importable at build time "
                    "(install torch first, then pip install --no-build-isolation)")
        return [], {}

    cpu_sources, cuda_sources = sources()
    mode = os.environ.get("ROME_FAST_CUDA", "auto").lower()
    why_no_cuda = None
    if mode in ("0", "no", "off", "false"):
        why_no_cuda = "ROME_FAST_CUDA=0 at build time"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU build"
    elif ce.CUDA_HOME is None:
        why_no_cuda = "nvcc / CUDA_HOME not found at build time"
    if why_no_cuda and mode in ("1", "yes", "on", "true"):
        raise RuntimeError(f"ROME_FAST_CUDA=1 but the CUDA build is impossible: {why_no_cuda}")

    if why_no_cuda is None:
        archs = os.environ.get("ROME_FAST_CUDA_ARCH")
        if archs is None:
            archs = DEFAULT_CUDA_ARCHS
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                archs += f";{major}{minor}{'a' if major == 9 else ''}"
        ext = ce.CUDAExtension(
            "rome_fast._C", cpu_sources + cuda_sources,
            extra_compile_args={"cxx": CXX_FLAGS + [CUDA_DEFINE],
                                "nvcc": NVCC_FLAGS + [CUDA_DEFINE] + gencode_flags(archs)},
            extra_link_args=LD_FLAGS)
    else:
        ext = ce.CppExtension("rome_fast._C", cpu_sources,
                              extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LD_FLAGS)
    _write_info(cpu_ext=True, cuda_ext=why_no_cuda is None, why_no_cuda=why_no_cuda,
                torch_at_build=torch.__version__, cuda_at_build=torch.version.cuda)

    class OptionalBuildExt(ce.BuildExtension):
        """A compile failure leaves a working pure-PyTorch package and says why."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if mode in ("1", "yes", "on", "true"):
                    raise
                traceback.print_exc()
                print(f"WARNING: rome_fast's compiled core failed to build ({exc}); "
                      "the plain-PyTorch path will be used.", file=sys.stderr)
                _write_info(cpu_ext=False, cuda_ext=False, note=f"compile failed: {exc}")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


# setuptools runs this file as __main__ (`pip install`, `python setup.py ...`); the compile check
# imports it under another name for the flag lists above.
if __name__ == "__main__":
    from setuptools import setup

    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
