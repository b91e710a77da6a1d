"""Build rome_fast's compiled core.

The C++ (CPU) core is always attempted; the CUDA kernels are added where torch has CUDA and nvcc is
found. Environment switches (as flash-attention / xformers do):

  ROME_FAST_CUDA=auto|1|0   auto (default): CUDA when possible; 1: force (fail loudly); 0: skip
  ROME_FAST_NO_EXT=1        build nothing: the package runs on its plain-PyTorch path
  ROME_FAST_CUDA_ARCH="90a;80"  compute capabilities for nvcc (default: 80;90 + the local GPU's)
  MAX_JOBS=N                ninja parallelism

A failed compile is a warning, not a failed install: `rome_fast.backend_info()` then says why.
Install with `pip install --no-build-isolation -e .` so the extension is built against your torch.
"""
import json
import os
import sys
import traceback
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
INFO_FILE = ROOT / "rome_fast" / "_build_info.json"


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

    cpu_sources = ["csrc/bindings.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
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

    cxx = ["-O3", "-std=c++17"]
    if sys.platform != "darwin":
        cxx.append("-fopenmp")
    ldflags = ["-fopenmp"] if sys.platform != "darwin" else []
    if why_no_cuda is None:
        archs = os.environ.get("ROME_FAST_CUDA_ARCH")
        if archs is None:
            archs = "80;90"
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                archs += f";{major}{minor}{'a' if major == 9 else ''}"
        gencode = []
        for a in sorted(set(archs.replace(",", ";").split(";"))):
            if a:
                gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        ext = ce.CUDAExtension(
            "rome_fast._C", cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DROME_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                                         "-DROME_FAST_WITH_CUDA"] + gencode},
            extra_link_args=ldflags)
    else:
        ext = ce.CppExtension("rome_fast._C", cpu_sources,
                              extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
