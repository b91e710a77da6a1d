"""MEMIT's per-layer solve: X = (λC + KKᵀ)⁻¹ K (d_k × n, float64), so that ΔW = R Xᵀ minimises
λ·E‖ΔW k₀‖² + ‖(W + ΔW)K − (WK + R)‖² over the layer's keys k₀ (C = E[k₀k₀ᵀ]).

The reference forms λC + KKᵀ and solves it with LU (`solve_reference`). The fast path (`solve`)
reuses C's cached Cholesky factor C = LLᵀ. With n edits fewer than the key width d_k, Woodbury's
identity gives, for λ > 0,

    (λC + KKᵀ)⁻¹ = λ⁻¹C⁻¹ − λ⁻¹C⁻¹K (λI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹,

and multiplying by K, with Y = C⁻¹K and G = KᵀC⁻¹K:

    X = λ⁻¹[Y − Y(λI + G)⁻¹G] = λ⁻¹ Y (λI + G)⁻¹[(λI + G) − G] = Y (λI + G)⁻¹.

So X needs two triangular solves with L (Z = L⁻¹K, Y = L⁻ᵀZ; G = ZᵀZ is symmetric positive
semi-definite by construction) and one n×n Cholesky: O(d_k²n + n³) instead of O(d_k³). With
n ≥ d_k, λC + KKᵀ is formed from the factor and Cholesky-factored directly. Everything in fp64."""
from __future__ import annotations

import torch

from ..solve_update import CovarianceFactor

METHODS = ("auto", "woodbury", "direct")


class SingularSystemError(ValueError):
    """λC + KKᵀ is singular (or not positive definite), so MEMIT's solve has no unique answer."""


def check_lambda(lam: float, n: int, d_k: int) -> None:
    if lam < 0:
        raise SingularSystemError(f"mom2_update_weight (λ) = {lam} is negative: λC + KKᵀ is then indefinite; "
                                  "use λ > 0")
    if lam == 0 and n < d_k:
        raise SingularSystemError(f"mom2_update_weight (λ) = 0 makes λC + KKᵀ = KKᵀ singular: its rank is at "
                                  f"most the {n} edit(s), below the key width {d_k}; use λ > 0")


def _singular(what: str, lam: float) -> SingularSystemError:
    return SingularSystemError(f"{what} is singular at mom2_update_weight (λ) = {lam:g}: the statistics are "
                               "rank-deficient (too few tokens for the key width?) or λ is too small; "
                               "collect more statistics or raise λ")


def _lu_solve(A: torch.Tensor, K: torch.Tensor, what: str, lam: float) -> torch.Tensor:
    """A⁻¹K by LU with partial pivoting (what torch.linalg.solve does), refusing a singular A: an
    exact zero pivot, or one below d·ε of the largest (rounding alone can make a singular
    matrix's pivots nonzero, and the solve then returns large garbage)."""
    LU, piv, info = torch.linalg.lu_factor_ex(A)
    diag = LU.diagonal().abs()
    if int(info) != 0 or float(diag.min()) <= A.shape[0] * torch.finfo(A.dtype).eps * float(diag.max()):
        raise _singular(what, lam)
    X = torch.linalg.lu_solve(LU, piv, K)
    if not bool(torch.isfinite(X).all()):
        raise _singular(what, lam)
    return X


def solve_reference(C: torch.Tensor, K: torch.Tensor, lam: float) -> torch.Tensor:
    """solve(λC + KKᵀ, K) by LU in float64, as the reference."""
    K = K.double()
    check_lambda(lam, K.shape[1], K.shape[0])
    return _lu_solve(lam * C.double().to(K.device) + K @ K.T, K, "λC + KKᵀ", lam)


def moment_from_factor(factor: CovarianceFactor) -> torch.Tensor:
    """C again, in fp64, from its factor (LLᵀ, or PLU)."""
    F = factor.factor.double()
    if factor.kind == "cholesky":
        return F @ F.mT
    P, L, U = torch.lu_unpack(F, factor.pivots)
    return P @ L @ U


def solve(factor: CovarianceFactor, K: torch.Tensor, lam: float, method: str = "auto") -> torch.Tensor:
    """X = (λC + KKᵀ)⁻¹ K in float64 on the factor's device. method: "woodbury" (n < d_k, C
    positive definite), "direct", or "auto" (Woodbury when it applies)."""
    if method not in METHODS:
        raise ValueError(f"unknown solve method {method!r}: one of {METHODS}")
    if K.dim() != 2 or K.shape[0] != factor.d:
        raise ValueError(f"K must be [d_k, n] with d_k = {factor.d} (the statistics' width), got "
                         f"{list(K.shape)}")
    d, n = K.shape
    check_lambda(lam, n, d)
    K = K.to(factor.device, torch.float64)
    if method == "auto":
        method = "woodbury" if n < d and factor.kind == "cholesky" else "direct"
    if method == "woodbury":
        if factor.kind != "cholesky":
            raise ValueError(f"the Woodbury solve needs C positive definite; {factor.note}")
        L = factor.factor.double()
        Z = torch.linalg.solve_triangular(L, K, upper=False)       # L⁻¹K
        Y = torch.linalg.solve_triangular(L.mT, Z, upper=True)     # C⁻¹K
        A = Z.T @ Z
        A.diagonal().add_(lam)                                      # λI + KᵀC⁻¹K
        chol, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise _singular("λI + KᵀC⁻¹K", lam)
        return torch.cholesky_solve(Y.T, chol).T                    # Y (λI + G)⁻¹ (A symmetric)
    A = moment_from_factor(factor).mul_(lam).addmm_(K, K.T)
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(K, chol)
    return _lu_solve(A, K, "λC + KKᵀ", lam)                        # not positive definite: LU, as the reference
