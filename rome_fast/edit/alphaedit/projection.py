"""AlphaEdit's null-space projection P of each edited layer, from the layer's statistics.

C = E[k₀k₀ᵀ] is the mean second moment of the layer's keys (the same statistics as MEMIT's). Its
eigenvectors with eigenvalue below `nullspace_threshold` (absolute, in C's units) span the
directions the preserved keys (almost) never take; P = U_s U_sᵀ projects onto them, so an update
ΔP leaves every preserved key's output as it was: ΔP·k₀ ≈ 0.

* reference (`get_project`): a full fp32 SVD of C on the CPU (C is symmetric positive
  semi-definite, so its singular values are its eigenvalues), P as a d_k × d_k fp32 matrix,
  computed once per (model, layer, statistics) and kept for the process;
* fast (`layer_null_spaces`): a symmetric eigendecomposition (fp64) on the model's device, the same
  threshold on its eigenvalues; only the basis U_s (d_k × r, fp32) is kept, cached per (model,
  layer, statistics file) like C's factor.

Both refuse statistics whose rank is below the key width (fewer tokens than d_k: the "null space"
would then hold directions the corpus never showed, not ones it preserves) and a threshold that
keeps no direction (P = 0: no edit could be written)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models import adapter_for
from ..fast_stats import layer_stats_fast
from ..memit.stats import check_cov, collect_missing_stats, default_stats
from ..solve_update import factor_key
from ..stats import corpus_ds_name, layer_stats, stats_model_name

_P_REF: dict = {}
_BASIS: "OrderedDict[tuple, NullSpace]" = OrderedDict()
CACHE_SIZE = 8  # bases of a GPT-J layer are up to 1 GiB in fp32: keep a few, least recently used out


class StatisticsError(ValueError):
    """The statistics cannot define a null space (rank below the key width, or none kept)."""


@dataclass
class NullSpace:
    """U (d_k × r, fp32, orthonormal columns): a basis of the layer's null space; P = U Uᵀ."""
    U: torch.Tensor
    eigenvalues: torch.Tensor   # every eigenvalue of C, ascending (fp32, CPU)
    threshold: float

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def d(self) -> int:
        return self.U.shape[0]

    def matrix(self) -> torch.Tensor:
        return self.U @ self.U.T


def check_statistics(S: torch.Tensor, d: int, count, threshold: float, where: str) -> int:
    """The number of directions kept (eigenvalues S below the threshold), after refusing
    statistics of rank below d and a threshold that keeps none."""
    if count is not None and count < d:
        raise StatisticsError(f"{where}: the statistics come from {count} tokens, fewer than the key width {d}, "
                              f"so C has rank below {d} and its null space holds directions the corpus never "
                              "showed; collect statistics over more text (mom2_n_samples, a larger corpus)")
    if count is None:  # a given C: its numerical rank (torch.linalg.matrix_rank's tolerance)
        tol = float(S.abs().max()) * d * torch.finfo(torch.float32).eps
        rank = int((S > tol).sum())
        if rank < d:
            raise StatisticsError(f"{where}: C has rank {rank}, below the key width {d} (statistics from too few "
                                  "tokens?): its null space would hold directions the corpus never showed; "
                                  "collect statistics over more text")
    kept = int((S < threshold).sum())
    if kept == 0:
        raise StatisticsError(f"{where}: nullspace_threshold {threshold:g} keeps no direction (C's smallest "
                              f"eigenvalue is {float(S.min()):.4g}), so every update would be projected to "
                              "zero; raise the threshold above it")
    return kept


def projection_reference(C: torch.Tensor, threshold: float, count=None, where: str = "C") -> torch.Tensor:
    """P as the reference builds it: fp32 SVD of C on the CPU, the singular vectors whose singular
    value is below the threshold, P = U_s U_sᵀ (fp32, CPU)."""
    C = C.detach().float().cpu()
    U, S, _ = torch.linalg.svd(C)
    check_statistics(S, C.shape[0], count, threshold, where)
    Us = U[:, S < threshold]
    return Us @ Us.T


def null_space(C: torch.Tensor, threshold: float, count=None, where: str = "C", device=None) -> NullSpace:
    """The fast path's basis: a symmetric eigendecomposition of C in fp64 on `device` (default C's),
    kept in fp32. fp64 because an fp32 eigh loses the subspace to ~1e-4 where eigenvalues crowd
    the threshold (the reference's fp32 SVD holds ~1e-5); fp64 agrees with both to their own error."""
    C = C.detach().to(device or C.device, torch.float64)
    S, V = torch.linalg.eigh((C + C.T) / 2)
    check_statistics(S, C.shape[0], count, threshold, where)
    return NullSpace(V[:, S < threshold].float().contiguous(), S.float().cpu(), float(threshold))


def _where(model, layer, path) -> str:
    return f"statistics of layer {layer} ({adapter_for(model).rewrite_name(layer)}" + (f", {path})" if path else ")")


def get_project(model, tok, hparams, layer: int, stats_dir=None, corpus=None, cov=None,
                progress: bool = True) -> torch.Tensor:
    """The reference's P of `layer` (fp32, on the model's device), cached for the process."""
    device = next(model.parameters()).device
    if cov is not None:
        from ..sites import edit_sites
        C = check_cov(cov, hparams, {s.layer: s.key_size for s in edit_sites(model, hparams)})[layer]
        return projection_reference(C, float(hparams.nullspace_threshold), None, _where(model, layer, None)
                                    ).to(device)
    model_name = stats_model_name(model)
    stats_dir = default_stats(stats_dir, corpus)
    ds_name = corpus_ds_name(corpus, hparams.mom2_dataset)
    where = (str(Path(stats_dir).resolve()) if stats_dir else
             str(corpus) if isinstance(corpus, (str, Path)) else id(corpus))
    name = adapter_for(model).rewrite_name(layer)
    key = (model_name, name, where, ds_name, hparams.mom2_n_samples, hparams.mom2_dtype,
           float(hparams.nullspace_threshold))
    if key not in _P_REF:
        st = layer_stats(model, tok, name, stats_dir, ds_name, to_collect=("mom2",),
                         sample_size=hparams.mom2_n_samples, precision=hparams.mom2_dtype, corpus=corpus,
                         model_name=model_name, progress=progress)
        _P_REF[key] = projection_reference(st.mom2.moment(), float(hparams.nullspace_threshold), st.mom2.count,
                                           _where(model, layer, st.path))
    return _P_REF[key].to(device)


def layer_null_spaces(model, tok, hparams, key_sizes: dict, stats_dir, corpus, cov=None, progress=True,
                      device=None) -> dict:
    """{layer: NullSpace} for the fast path. Missing statistics files are collected for every
    layer in one pass and written; the bases are cached per (model, layer, statistics file,
    threshold) and decomposed on a miss only."""
    device = device or next(model.parameters()).device
    t = float(hparams.nullspace_threshold)
    if cov is not None:
        return {l: null_space(c, t, None, _where(model, l, None), device)
                for l, c in check_cov(cov, hparams, key_sizes).items()}
    stats_dir = default_stats(stats_dir, corpus)
    names, paths, collect = collect_missing_stats(model, tok, hparams, stats_dir, corpus, progress)
    model_name, ds_name = collect["model_name"], collect["ds_name"]
    in_memory = {}
    out = {}
    for l, name in names.items():
        where = None if stats_dir is not None else (str(corpus) if isinstance(corpus, (str, Path)) else id(corpus))
        key = (factor_key(model_name, name, paths.get(l)), where, ds_name, hparams.mom2_n_samples,
               hparams.mom2_dtype, hparams.mom2_act_dtype, t, str(device))
        if key in _BASIS:
            _BASIS.move_to_end(key)
        else:
            if stats_dir is not None:
                st = layer_stats_fast(model, tok, name, stats_dir, **collect)
            else:  # an in-memory corpus: one pass for every layer at the first miss
                if name not in in_memory:
                    in_memory.update(layer_stats_fast(model, tok, [n for n in names.values() if n not in in_memory],
                                                      None, **collect))
                st = in_memory[name]
            _BASIS[key] = null_space(st.mom2.moment(), t, st.mom2.count, _where(model, l, paths.get(l)), device)
            while len(_BASIS) > CACHE_SIZE:
                _BASIS.popitem(last=False)
        out[l] = _BASIS[key]
    return out


def clear_cache() -> None:
    _P_REF.clear()
    _BASIS.clear()
