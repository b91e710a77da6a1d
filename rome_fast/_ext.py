"""Loads the compiled core, whose ops are registered with PyTorch's dispatcher as torch.ops.rome_fast.*
(docs/kernels.md). Importing never fails: when the extension is missing, the wrappers in
rome_fast.ops fall back to plain PyTorch, a native op asked for by name raises one clear error, and
`backend_info()` says what was built and why something was not."""
from __future__ import annotations

import json
from pathlib import Path

import torch

_C = None
_IMPORT_ERROR: str | None = None
try:
    from . import _C  # type: ignore[attr-defined,no-redef]  # registers the ops on import
except ImportError as exc:  # not built, or built against another torch
    _IMPORT_ERROR = (str(exc) if any(Path(__file__).parent.glob("_C.*"))
                     else "rome_fast/_C is not built")

_FIX = ("rebuild with `pip install --no-build-isolation -e .` "
        "(needs a C++ compiler; add nvcc + a CUDA torch for the GPU kernels)")


def _build_info() -> dict:
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cpu_ext_available() -> bool:
    return _C is not None


_HAS_CUDA = _C is not None and bool(_C.has_cuda())  # read once: torch.compile traces the wrappers


def cuda_ext_available() -> bool:
    return _C is not None and _HAS_CUDA and torch.cuda.is_available()


def native_for(t: torch.Tensor) -> bool:
    """True when the compiled core can run on the device of `t`."""
    if _C is None:
        return False
    if t.is_cuda:
        return cuda_ext_available()
    return t.device.type == "cpu"


def require_native():
    """torch.ops.rome_fast, or a clear error when the compiled core is not loaded."""
    if _C is None:
        raise RuntimeError(f"rome_fast's compiled core is not available ({_IMPORT_ERROR}); {_FIX}")
    return torch.ops.rome_fast


def register_fake(name: str):
    """torch.library.register_fake for op `name` when the core is loaded (a fake describes the
    outputs of an op from its inputs' metadata, for torch.compile); a no-op decorator otherwise.
    A core without the op was built from older sources: it is then treated as absent."""
    def deco(fn):
        global _C, _IMPORT_ERROR
        if _C is not None and not hasattr(torch.ops.rome_fast, name):
            _C, _IMPORT_ERROR = None, f"the compiled core has no op {name!r} (built from older sources)"
        if _C is not None:
            torch.library.register_fake(f"rome_fast::{name}")(fn)
        return fn
    return deco


def backend_info() -> dict:
    """What is built and usable here, and why anything is missing."""
    build = _build_info()
    info = {
        "cpu_ext": cpu_ext_available(),
        "cuda_ext": cuda_ext_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "built_with": {k: v for k, v in build.items() if k != "note"} or None,
    }
    why = []
    if _C is None:
        why.append(f"compiled core not importable: {_IMPORT_ERROR}; {_FIX}")
        if build.get("note"):
            why.append(build["note"])
    elif not _HAS_CUDA:
        why.append("CUDA kernels not built: " + (build.get("why_no_cuda") or "unknown reason"))
    elif not torch.cuda.is_available():
        why.append("CUDA kernels built, but no CUDA device is visible")
    if build.get("torch_at_build") and build["torch_at_build"] != torch.__version__:
        why.append(f"built against torch {build['torch_at_build']}, running {torch.__version__}")
    if why:
        info["why"] = why
    return info
