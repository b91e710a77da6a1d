"""The weight update of a ROME edit (csrc/rome_update.cpp, csrc/cpu/update_ops.cpp,
csrc/cuda/update_kernels.cu) beside its plain-PyTorch references; the algorithm and its numerics are
in docs/kernels.md.

The reference inverts the second moment C = E[kkᵀ] in fp32 (`torch.inverse`), takes
u = C⁻¹k̄ / ‖C⁻¹k̄‖, right = (v* − y*) / ⟨k*, u⟩ and adds the materialised d_k×d_v matrix u ⊗ right
to W (`rome_update_ref`). The fused `rome_update_` solves with a cached factor of C (a
`CovarianceFactor`, rome_fast.edit.solve_update), normalises, divides and adds u ⊗ right to W in
place, in W's dtype with fp32 sums, without materialising the update. Batched: kbar/kstar [d_k, n],
resid [d_v, n] apply n edits as one rank-n update (the same as applying them one by one, as all n
are computed from the same W).

Layouts: "in_out" — W is [d_k, d_v] (GPT-2 Conv1D, the update is added as-is); "out_in" — W is
[d_v, d_k] (nn.Linear: GPT-J, NeoX, Llama; the update is transposed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from .. import _ext

if TYPE_CHECKING:
    from ..edit.solve_update import CovarianceFactor

LAYOUTS = ("in_out", "out_in")
# An edit whose |⟨k*, u⟩| / ‖k*‖ is below this would scale the residual by more than 10⁶.
MIN_COSINE = 1e-6


def _dims(W: torch.Tensor, layout: str) -> Tuple[int, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"rome_fast: layout must be 'in_out' (W is [d_k, d_v], GPT-2 Conv1D) or "
                         f"'out_in' (W is [d_v, d_k], nn.Linear), got {layout!r}")
    if W.dim() != 2:
        raise ValueError(f"rome_fast: W must be 2-D, got shape {tuple(W.shape)}")
    return (W.shape[0], W.shape[1]) if layout == "in_out" else (W.shape[1], W.shape[0])


# ---- rank_k_update_ ---------------------------------------------------------------------------


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


@_ext.register_fake("rank_k_update_")
def _rank_k_update_fake(W, U, R, layout):
    return None


# ---- the pieces of rome_update_ ---------------------------------------------------------------
# cholesky_solve(L, B) is torch.cholesky_solve(B, L) with float64 sums (its reference in the tests).


@_ext.register_fake("cholesky_solve")
def _cholesky_solve_fake(L, B):
    return torch.empty_like(B, memory_format=torch.contiguous_format)


def normalize_dot_ref(Y: torch.Tensor, kstar: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per column j: U[:, j] = Y[:, j] / ‖Y[:, j]‖ (float32; 0 where the norm is 0) and stats [3, n]
    float64 = (‖Y[:, j]‖, ⟨kstar[:, j], Y[:, j]⟩, ‖kstar[:, j]‖), all summed in float64."""
    Y64, k64 = Y.to(torch.float64), kstar.to(torch.float64)
    norm = Y64.norm(dim=0)
    inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    stats = torch.stack([norm, (k64 * Y64).sum(0), k64.norm(dim=0)])
    return (Y64 * inv).to(torch.float32), stats


@_ext.register_fake("normalize_dot")
def _normalize_dot_fake(Y, kstar):
    return (torch.empty_like(kstar, memory_format=torch.contiguous_format),
            kstar.new_empty((3, Y.shape[1]), dtype=torch.float64))


# ---- rome_update_ -----------------------------------------------------------------------------


def _check_edit_inputs(W, factor: "CovarianceFactor", kbar, kstar, resid, layout) -> None:
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


def _rome_update_torch(W, factor: "CovarianceFactor", kbar, kstar, resid, layout):
    """The fused op's algorithm (csrc/rome_update.cpp) in plain PyTorch: the fallback without a
    compiled core, with the same checks and the same roundings up to the order of fp64 sums."""
    _check_edit_inputs(W, factor, kbar, kstar, resid, layout)
    vec = kbar.dim() == 1
    kb = kbar.unsqueeze(1) if vec else kbar
    ks = (kstar.unsqueeze(1) if vec else kstar).to(torch.float32)
    rs = (resid.unsqueeze(1) if vec else resid).to(torch.float64)
    U, stats = normalize_dot_ref(factor.solve(kb), ks)
    norm, dot, knorm = stats
    for j in range(U.shape[1]):
        if not (torch.isfinite(norm[j]) and norm[j] > 0):
            raise ValueError(f"rome_fast: C^-1 kbar is zero or not finite for edit {j}")
        cosine = dot[j] / (norm[j] * knorm[j])
        if not (torch.isfinite(cosine) and cosine.abs() > MIN_COSINE):
            raise ValueError(f"rome_fast: the denominator <kstar, u> is ~0 for edit {j} "
                             f"(<kstar, u> = {float(dot[j] / norm[j]):.3g}, cosine {float(cosine):.3g})")
    R = (rs / (dot / norm)).to(torch.float32)  # divided in fp64, rounded once
    rank_k_update_ref(W, U, R, layout)
    return (U.squeeze(1), R.squeeze(1)) if vec else (U, R)


def rome_update_(W: torch.Tensor, factor: "CovarianceFactor", kbar: torch.Tensor,
                 kstar: torch.Tensor, resid: torch.Tensor, layout: str,
                 use_native: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply ROME edit(s) to W in place and return (u, right), both float32.

    u = C⁻¹k̄ / ‖C⁻¹k̄‖ (solved with the cached `factor`, a CovarianceFactor), right = resid / ⟨k*, u⟩
    with resid = v* − y*, and W += u ⊗ right ("in_out") or its transpose ("out_in"). kbar, kstar
    [d_k] and resid [d_v] for one edit; [d_k, n] / [d_v, n] for n edits as one rank-n update. One
    compiled call where the core is built for W's device, else the same arithmetic in plain PyTorch.
    """
    if not all(hasattr(factor, a) for a in ("factor", "kind", "pivots", "d", "solve")):
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


@_ext.register_fake("rome_update_")
def _rome_update_fake(W, factor, kbar, kstar, resid, layout, factor_kind="cholesky", pivots=None):
    return (kbar.new_empty(kbar.shape, dtype=torch.float32),
            resid.new_empty(resid.shape, dtype=torch.float32))


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
