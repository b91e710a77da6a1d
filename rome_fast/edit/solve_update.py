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
from typing import Callable, Hashable, Optional, Tuple, Union

import torch

from rome_fast import _ext

log = logging.getLogger(__name__)

LAYOUTS = ("in_out", "out_in")
# An edit whose |⟨k*, u⟩| / ‖k*‖ is below this would scale the residual by more than 10⁶.
MIN_COSINE = 1e-6


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


# ----------------------------------------------------------------------------------------------
# Weight update


def _dims(W: torch.Tensor, layout: str) -> Tuple[int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"rome_fast: layout must be 'in_out' (W is [d_k, d_v], GPT-2 Conv1D) or "
                         f"'out_in' (W is [d_v, d_k], nn.Linear), got {layout!r}")
    if W.dim() != 2:
        raise ValueError(f"rome_fast: W must be 2-D, got shape {tuple(W.shape)}")
    return (W.shape[0], W.shape[1]) if layout == "in_out" else (W.shape[1], W.shape[0])


def rank_k_update_ref(W: torch.Tensor, U: torch.Tensor, R: torch.Tensor, layout: str) -> torch.Tensor:
    """W += U Rᵀ ("in_out") or R Uᵀ ("out_in") in place, materialising the update in fp32."""
    _dims(W, layout)
    U2 = U.to(torch.float32).reshape(U.shape[0], -1)
    R2 = R.to(torch.float32).reshape(R.shape[0], -1)
    upd = U2 @ R2.T
    W[...] += upd if layout == "in_out" else upd.T
    return W


def rank_k_update_(W: torch.Tensor, U: torch.Tensor, R: torch.Tensor, layout: str,
                   use_native: Optional[bool] = None) -> torch.Tensor:
    """W += U Rᵀ ("in_out", W [d_k, d_v]) or W += R Uᵀ ("out_in", W [d_v, d_k]) in place, U [d_k] or
    [d_k, n], R [d_v] or [d_v, n]: fp32 sums, one rounding per element, no d_k×d_v temporary."""
    if use_native is None:
        use_native = _ext.native_for(W) and W.is_contiguous()
    if not use_native:
        return rank_k_update_ref(W, U, R, layout)
    U2 = U.unsqueeze(1) if U.dim() == 1 else U
    R2 = R.unsqueeze(1) if R.dim() == 1 else R
    _ext.require_native().rank_k_update_(
        W, U2.to(device=W.device, dtype=torch.float32).contiguous(),
        R2.to(device=W.device, dtype=torch.float32).contiguous(), layout)
    return W


def _check_edit_inputs(W, factor: CovarianceFactor, kbar, kstar, resid, layout) -> None:
    """The compiled core's checks, for the plain-PyTorch path (same messages)."""
    d_k, d_v = _dims(W, layout)
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rome_fast: W must be float32, float16 or bfloat16, got {W.dtype}")
    if factor.d != d_k:
        raise ValueError(f"rome_fast: factor is [{factor.d}, {factor.d}] but W {list(W.shape)} in "
                         f"layout '{layout}' has d_k = {d_k} (is the layout right?)")
    if kbar.dim() not in (1, 2):
        raise ValueError(f"rome_fast: kbar must be [d_k] or [d_k, n], got shape {list(kbar.shape)}")
    if kstar.shape != kbar.shape:
        raise ValueError(f"rome_fast: kstar shape {list(kstar.shape)} != kbar shape {list(kbar.shape)}")
    if kbar.shape[0] != d_k:
        raise ValueError(f"rome_fast: kbar has {kbar.shape[0]} entries but W {list(W.shape)} in "
                         f"layout '{layout}' has d_k = {d_k} (is the layout right?)")
    n = 1 if kbar.dim() == 1 else kbar.shape[1]
    if resid.dim() != kbar.dim() or resid.shape[0] != d_v or (kbar.dim() == 2 and resid.shape[1] != n):
        raise ValueError(f"rome_fast: resid must be {'[d_v]' if kbar.dim() == 1 else '[d_v, n]'} with "
                         f"d_v = {d_v} (W {list(W.shape)} in layout '{layout}') and n = {n}, got "
                         f"shape {list(resid.shape)}")
    for name, t in (("kbar", kbar), ("kstar", kstar), ("resid", resid)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"rome_fast: {name} contains NaN or Inf")


def _rome_update_torch(W, factor: CovarianceFactor, kbar, kstar, resid, layout):
    """The fused call's arithmetic in plain PyTorch (the fallback without a compiled core)."""
    _check_edit_inputs(W, factor, kbar, kstar, resid, layout)
    vec = kbar.dim() == 1
    kb = kbar.unsqueeze(1) if vec else kbar
    ks = (kstar.unsqueeze(1) if vec else kstar).to(torch.float64)
    rs = (resid.unsqueeze(1) if vec else resid).to(torch.float64)
    Y = factor.solve(kb).to(torch.float64)
    norm = Y.norm(dim=0)
    for j in range(Y.shape[1]):
        if not (torch.isfinite(norm[j]) and norm[j] > 0):
            raise ValueError(f"rome_fast: C^-1 kbar is zero or not finite for edit {j}")
    U64 = Y / norm
    dot = (ks * U64).sum(0)
    cosine = dot / ks.norm(dim=0)
    for j in range(Y.shape[1]):
        if not (torch.isfinite(cosine[j]) and cosine[j].abs() > MIN_COSINE):
            raise ValueError(f"rome_fast: the denominator <kstar, u> is ~0 for edit {j} "
                             f"(<kstar, u> = {float(dot[j]):.3g}, cosine {float(cosine[j]):.3g})")
    U = U64.to(torch.float32)
    R = (rs / dot).to(torch.float32)
    rank_k_update_ref(W, U, R, layout)
    return (U.squeeze(1), R.squeeze(1)) if vec else (U, R)


def rome_update_(W: torch.Tensor, factor: CovarianceFactor, kbar: torch.Tensor, kstar: torch.Tensor,
                 resid: torch.Tensor, layout: str, use_native: Optional[bool] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply ROME edit(s) to W in place and return (u, right), both float32.

    u = C⁻¹k̄ / ‖C⁻¹k̄‖ (solved with the cached `factor`), right = resid / ⟨k*, u⟩ with
    resid = v* − y*, and W += u ⊗ right ("in_out") or its transpose ("out_in"). kbar, kstar [d_k]
    and resid [d_v] for one edit; [d_k, n] / [d_v, n] for n edits as one rank-n update. One compiled
    call where the core is built for W's device, else the same arithmetic in plain PyTorch.
    """
    if not isinstance(factor, CovarianceFactor):
        raise TypeError(f"rome_fast: factor must be a CovarianceFactor, got {type(factor).__name__}")
    if factor.factor.device != W.device:
        raise ValueError(f"rome_fast: the factor is on {factor.factor.device} but W is on {W.device}")
    kbar, kstar, resid = (t.to(W.device) for t in (kbar, kstar, resid))
    if use_native is None:
        use_native = _ext.native_for(W) and W.is_contiguous()
    if not use_native:
        return _rome_update_torch(W, factor, kbar, kstar, resid, layout)
    return _ext.require_native().rome_update_(W, factor.factor, kbar, kstar, resid, layout,
                                              factor.kind, factor.pivots)


def rome_update_ref(W: torch.Tensor, C: Optional[torch.Tensor], kbar: torch.Tensor,
                    kstar: torch.Tensor, resid: torch.Tensor, layout: str,
                    C_inv: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference implementation (compute_u with mom2_adjustment, compute_v's right vector,
    execute_rome's outer product, upd_matrix_match_shape), in place on W; returns (u, right).

    C⁻¹ = torch.inverse(C in fp32) unless the cached `C_inv` is given (the reference caches it per
    (model, layer)). For [d_k, n] inputs the n edits are applied one after another.
    """
    _dims(W, layout)
    if C_inv is None:
        C_inv = torch.inverse(C.to(device=W.device, dtype=torch.float32))
    if kbar.dim() == 2:
        outs = [rome_update_ref(W, None, kbar[:, j], kstar[:, j], resid[:, j], layout, C_inv)
                for j in range(kbar.shape[1])]
        return torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)
    u = C_inv @ kbar.to(device=W.device, dtype=torch.float32)
    u = u / u.norm()
    right = resid.to(device=W.device, dtype=torch.float32) / torch.dot(
        kstar.to(device=W.device, dtype=torch.float32), u)
    upd = u.unsqueeze(1) @ right.unsqueeze(0)
    W[...] += upd if layout == "in_out" else upd.T
    return u, right
