"""Solve and weight update of a ROME edit (docs/editing.md, "The update").

The reference inverts the second moment C = E[kkᵀ] in fp32 (`torch.inverse`), takes
u = C⁻¹k̄ / ‖C⁻¹k̄‖, right = (v* − y*) / ⟨k*, u⟩ and adds the materialised d_k×d_v matrix u ⊗ right
to W. Here C is factored once (Cholesky in float64; LU when C is not positive definite) and cached
per (model, layer, statistics file); each edit is then one fused compiled call that solves with
the factor, normalises, divides and adds u ⊗ right to W in place, in W's dtype with fp32 sums,
without materialising the update. Batched: kbar/kstar [d_k, n], resid [d_v, n] apply n edits as one
rank-n update (the same as applying them one by one, as all n are computed from the same W).

Layouts: "in_out" — W is [d_k, d_v] (GPT-2 Conv1D, the update is added as-is); "out_in" — W is
[d_v, d_k] (nn.Linear: GPT-J, NeoX, Llama; the update is transposed).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Union

import torch

# the weight-update ops and their references live in rome_fast.ops; imported here for the edit code
from rome_fast.ops.update_ops import (  # noqa: F401
    LAYOUTS, MIN_COSINE, rank_k_update_, rank_k_update_ref, rome_update_, rome_update_ref)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Factor of C and its cache


class NotPositiveDefinite(ValueError):
    """C is not symmetric positive definite (`CovarianceFactor(..., allow_lu=False)`)."""

    def __init__(self, message: str, column: int):
        super().__init__(message)
        self.column = column


class CovarianceFactor:
    """C = E[kkᵀ] factored once for many solves.

    Factors in float64 (the factorisation is where the accuracy is lost on an ill-conditioned C):
    Cholesky when C is symmetric positive definite, else LU with partial pivoting — unless
    allow_lu=False (what editing asks for: a second moment that is not positive definite is
    refused, see docs/editing.md), which raises `NotPositiveDefinite` instead. `kind` says which,
    `cond_estimate` gives a cheap lower bound on cond(C) from the factor's diagonal, and `note`
    explains a fallback. The factor is kept on `device` in `dtype` (float64 by default; float32
    halves the memory and the per-solve reads at a cost of ~cond(C)·1e-7 relative error).
    """

    def __init__(self, C: torch.Tensor, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float64, allow_lu: bool = True):
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise ValueError(f"rome_fast: C must be a square matrix, got shape {tuple(C.shape)}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"rome_fast: the factor dtype must be float32 or float64, got {dtype}")
        device = torch.device(device) if device is not None else C.device
        C64 = C.to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(C64).all()):
            raise ValueError("rome_fast: C contains NaN or Inf")
        self.d = C64.shape[0]
        self.dtype = dtype
        self.device = device
        self.pivots: Optional[torch.Tensor] = None
        self.note = ""
        scale = C64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        asym = float((C64 - C64.T).abs().max() / scale)
        L, info = torch.linalg.cholesky_ex(C64) if asym <= 1e-6 else (None, -1)
        if L is not None and int(info) == 0:
            self.kind = "cholesky"
            diag = L.diagonal()
            self.cond_estimate = float((diag.max() / diag.min()) ** 2)
            self.factor = L.to(dtype).contiguous()  # row-major, as the compiled solve reads it
        else:
            self.note = (f"C is not symmetric (max |C - Cᵀ| / max |C| = {asym:.1e})" if asym > 1e-6
                         else f"C is not positive definite (Cholesky failed at column {int(info)})")
            if not allow_lu:
                raise NotPositiveDefinite(f"rome_fast: {self.note}", int(info))
            LU, piv, info = torch.linalg.lu_factor_ex(C64)
            if int(info) > 0:
                raise ValueError(f"rome_fast: C is singular: {self.note}, and LU found an exact "
                                 f"zero pivot at column {int(info)}")
            self.kind = "lu"
            diag = LU.diagonal().abs()
            self.cond_estimate = float(diag.max() / diag.min())
            self.factor = LU.to(dtype)
            self.pivots = piv.to(torch.int32)
            self.note += "; using the LU factorisation instead"
            log.warning("rome_fast: %s", self.note)
        del C64

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C⁻¹k for k [d] or [d, n], in the factor's dtype on its device."""
        vec = k.dim() == 1
        b = (k.unsqueeze(1) if vec else k).to(device=self.device, dtype=self.dtype)
        if self.kind == "cholesky":
            # two triangular solves: torch.cholesky_solve copies the factor on every call
            y = torch.linalg.solve_triangular(self.factor, b, upper=False)
            y = torch.linalg.solve_triangular(self.factor.mT, y, upper=True)
        else:
            y = torch.linalg.lu_solve(self.factor, self.pivots, b)
        return y.squeeze(1) if vec else y

    def __repr__(self) -> str:
        return (f"CovarianceFactor(d={self.d}, kind={self.kind!r}, dtype={self.dtype}, "
                f"device={self.device}, cond_estimate={self.cond_estimate:.2e})")


def factor_key(model_name: str, layer: Union[int, str], stats_path: Union[str, os.PathLike, None] = None
               ) -> tuple:
    """Cache key of a layer's factor: a rewritten statistics file (new mtime or size) misses."""
    if stats_path is None:
        return (model_name, str(layer), None, None, None)
    path = os.fspath(stats_path)
    try:
        st = os.stat(path)
        return (model_name, str(layer), os.path.abspath(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (model_name, str(layer), os.path.abspath(path), None, None)


_CACHE: "OrderedDict[Hashable, CovarianceFactor]" = OrderedDict()
# A GPT-J factor is 2 GiB in float64: keep a few layers, least recently used out first.
CACHE_SIZE = 4


def get_factor(key: Hashable, C: Union[torch.Tensor, Callable[[], torch.Tensor]], *,
               device: Union[str, torch.device, None] = None,
               dtype: torch.dtype = torch.float64) -> CovarianceFactor:
    """The cached factor for `key` (see `factor_key`), factoring C on a miss. C may be a zero-argument
    callable so the statistics are loaded only when the factor is not cached; it may return the
    factor itself (built on `device` in `dtype`), e.g. after checks of its own."""
    full = (key, str(torch.device(device)) if device is not None else None, dtype)
    hit = _CACHE.get(full)
    if hit is not None:
        _CACHE.move_to_end(full)
        return hit
    mat = C() if callable(C) else C
    fac = mat if isinstance(mat, CovarianceFactor) else CovarianceFactor(mat, device=device, dtype=dtype)
    _CACHE[full] = fac
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fac


def clear_factor_cache() -> None:
    _CACHE.clear()
