"""What an edit requires of its second moment C = E[kkᵀ], checked before any value optimisation
(docs/editing.md, "Statistics requirements").

ROME's direction is C⁻¹k̄: every key orthogonal to it (in C's metric) keeps its value. That
promise needs a C that is positive definite. Statistics from fewer keys than the key width are
singular, and statistics that are not positive definite (corrupt, or from a degenerate corpus)
make C⁻¹k̄ point along directions that ordinary keys use: the edit then damages unrelated facts.
Such statistics are refused here with what to do about them; `hparams.mom2_ridge` regularises
explicitly instead (C + ridge·mean(diag C)·I, the same relative ridge at every scale of C)."""
from __future__ import annotations

import math
import torch

from .solve_update import CovarianceFactor, NotPositiveDefinite


class StatisticsError(ValueError):
    """Statistics an edit must not use (the message names them and says what to do)."""


def describe(path, layer_name: str) -> str:
    return (f"statistics file {path}" if path is not None
            else f"the statistics of {layer_name} (collected in memory, not cached)")


def check_ridge(ridge) -> float | None:
    if ridge is None:
        return None
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge <= 0:
        raise ValueError(f"hparams.mom2_ridge must be a positive number (a fraction of C's mean "
                         f"eigenvalue, e.g. 1e-3) or None, got {ridge!r}")
    return float(ridge)


def check_key_count(count: int, key_width: int, where: str, ridge=None) -> None:
    """Refuse statistics from fewer keys than the key width (a singular C), unless regularised."""
    if count < key_width and ridge is None:
        raise StatisticsError(
            f"{where}: {count} keys for a key width of {key_width}. C = E[kkᵀ] from fewer keys than its "
            f"width is singular, and an edit through it damages unrelated facts. Collect at least "
            f"{key_width} keys (ten times as many for a well-conditioned C) from more texts "
            f"(hparams.mom2_n_samples, `rome-fast stats --samples N`) or a bigger corpus; or regularise "
            f"explicitly with hparams.mom2_ridge (e.g. 1e-3)")


def edit_covariance(stat, key_width: int, where: str, ridge=None, device=None,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, CovarianceFactor]:
    """(C, its Cholesky factor) for an edit, from a `SecondMoment` (sum and count), after checking
    the width, the count (at least `key_width` keys, unless regularised) and positive definiteness.
    C is returned in the statistics' dtype on `device`; `where` names the statistics in errors."""
    ridge = check_ridge(ridge)
    is_file = where.startswith("statistics file ")
    mom2 = stat.mom2
    if mom2 is None or mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1] or mom2.shape[0] != key_width:
        shape = None if mom2 is None else tuple(mom2.shape)
        raise StatisticsError(f"{where}: the second moment has shape {shape}, but the layer's key width is "
                              f"{key_width}{_redo(is_file)}")
    count = int(stat.count)
    check_key_count(count, key_width, where, ridge)
    C = stat.moment()
    if device is not None:
        C = C.to(device)
    if not bool(torch.isfinite(C).all()):
        raise StatisticsError(f"{where}: the second moment contains NaN or Inf{_redo(is_file)}")
    if ridge is not None:
        C = C + (ridge * C.diagonal().mean()) * torch.eye(key_width, dtype=C.dtype, device=C.device)
    try:
        factor = CovarianceFactor(C, device=C.device, dtype=dtype, allow_lu=False)
    except NotPositiveDefinite as exc:
        fix = ("a larger hparams.mom2_ridge" if ridge is not None else
               "more text (a bigger corpus or hparams.mom2_n_samples), or regularise explicitly with "
               "hparams.mom2_ridge (e.g. 1e-3)")
        raise StatisticsError(
            f"{where}: the second moment is not positive definite ({str(exc).removeprefix('rome_fast: ')}; "
            f"{count} keys, width {key_width}), and an edit through it damages unrelated facts. "
            + ("The file may be corrupt or summed in too low a precision: delete it to recompute it "
               "(mom2_dtype='float64' sums in float64), or use " if is_file else "Use ")
            + fix) from None
    return C, factor


def _redo(is_file: bool) -> str:
    return ": delete the file to recompute it" if is_file else ""

