"""The "fast" AlphaEdit backend (the default): MEMIT's fast backend (batched z, keys and H from
stopped forwards, the fused rank-k update) with AlphaEdit's projected solve.

The solve, exactly. With P = U_sUᵀ_s (U_s: d_k × r, orthonormal, the null-space basis) and
M = KKᵀ + K_pK_pᵀ, the reference solves the non-symmetric d_k × d_k system (PM + αI)X = PKRᵀ.
Any solution x of (PM + αI)x = Pk satisfies x = (Pk − PMx)/α, so it lies in P's range: x = U_s y,
and multiplying by U_sᵀ leaves the r × r symmetric positive definite system

    (U_sᵀ M U_s + αI) y = U_sᵀ k,

so U = U_s (K̂K̂ᵀ + U_sᵀK_pK_pᵀU_s + αI)⁻¹ K̂ with K̂ = U_sᵀK, and the update is W += R Uᵀ.
One r × r Cholesky in fp64 instead of a d_k × d_k product and LU in fp32, and the update is
exactly in P's range. The basis is decomposed once per (model, layer, statistics file) and
cached (projection.py)."""
from __future__ import annotations

import copy

import torch

from ..backend import WeightDelta, register_backend
from ..memit.fast import MEMITFast
from .main import AlphaEditBackend, accumulate_keys, init_cache
from .projection import layer_null_spaces


class AlphaEditFast(AlphaEditBackend, MEMITFast):
    name = "fast"

    def edit(self, model, tok, requests, hparams, cache_c: dict | None = None, **kw) -> list[WeightDelta]:
        # the registered backend is shared: each call keeps its K_p cache and null spaces on a copy
        # of its own, so calls may nest or run in threads
        call = copy.copy(self)
        call._cache, call._spaces = ({} if cache_c is None else cache_c), None
        deltas = MEMITFast.edit(call, model, tok, requests, hparams, **kw)
        if kw.get("return_info") is not None:
            for l, ns in call._spaces.items():
                kw["return_info"]["layers"][l]["null_space_rank"] = ns.rank
        return deltas

    def layer_solvers(self, model, tok, hparams, key_sizes, stats_dir, corpus, cov, progress) -> dict:
        init_cache(self._cache, hparams, key_sizes)
        self._spaces = layer_null_spaces(model, tok, hparams, key_sizes, stats_dir, corpus, cov, progress)
        return {l: (ns, self._cache) for l, ns in self._spaces.items()}

    def solve_layer(self, solver, K: torch.Tensor, hparams, layer: int) -> torch.Tensor:
        ns, cache = solver
        Us = ns.U.double()
        Kh = Us.T @ K.to(Us.device, torch.float64)                             # [r, n]
        Cp = cache[layer].to(Us.device, torch.float64)
        G = Us.T @ Cp @ Us
        G.addmm_(Kh, Kh.T).diagonal().add_(float(hparams.L2))
        chol = torch.linalg.cholesky(G)        # ≥ α on the diagonal's spectrum: positive definite
        return Us @ torch.cholesky_solve(Kh, chol)                             # [d_k, n]

    def after_batch(self, model, tok, requests, hparams, templates, solvers) -> None:
        accumulate_keys(model, tok, requests, hparams, templates, self._cache, stop=True)


register_backend(AlphaEditFast())
