"""The second moment C = E[kkᵀ] of every edited layer's keys, for both backends.

C must be the per-token mean (as `stats.layer_stats` writes it): unlike ROME, MEMIT's update is
not invariant to C's scale, since λC competes with KKᵀ. The reference path keeps C itself
(`get_cov`); the fast path keeps C's fp64 factor in the shared factor cache and collects every
missing layer in one pass (`layer_factors`)."""
from __future__ import annotations

from pathlib import Path

import torch

from ...models import adapter_for
from ..covariance import check_key_count, describe, edit_covariance
from ..fast import layer_factor
from ..solve_update import CovarianceFactor, get_factor
from ..stats import (context_length, corpus_ds_name, default_stats_dir, layer_stats, stats_model_name,
                     stats_path)

_COV: dict = {}


def default_stats(stats_dir, corpus):
    """The statistics cache: as given, else $ROME_FAST_CACHE/stats (none for an in-memory corpus)."""
    if stats_dir is None and not isinstance(corpus, (list, tuple)):
        return default_stats_dir()
    return stats_dir


def get_cov(model, tok, layer_name: str, mom2_dataset: str, mom2_n_samples, mom2_dtype: str = "float32",
            inv: bool = False, force_recompute: bool = False, *, stats_dir=None, corpus=None,
            progress: bool = True) -> torch.Tensor:
    """C (or C⁻¹ with inv=True) of `layer_name`'s input in fp32 on the model's device, cached for
    the process per model, layer and statistics identity (the reference keeps it on the CPU and
    moves it at every use)."""
    c = _moment(model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype, force_recompute,
                stats_dir, corpus, progress)[0].to(next(model.parameters()).device)
    return torch.inverse(c) if inv else c


def _moment(model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype, force_recompute, stats_dir,
            corpus, progress) -> tuple:
    """(C on the CPU, the number of keys it averages, where it comes from), cached."""
    model_name = stats_model_name(model)
    stats_dir = default_stats(stats_dir, corpus)
    where = (str(Path(stats_dir).resolve()) if stats_dir else
             str(corpus) if isinstance(corpus, (str, Path)) else id(corpus))
    ds_name = corpus_ds_name(corpus, mom2_dataset)
    key = (model_name, layer_name, where, ds_name, mom2_n_samples, mom2_dtype)
    if key not in _COV or force_recompute:
        st = layer_stats(model, tok, layer_name, stats_dir, ds_name, to_collect=("mom2",),
                         sample_size=mom2_n_samples, precision=mom2_dtype, corpus=corpus,
                         model_name=model_name, progress=progress, force_recompute=force_recompute)
        _COV[key] = (st.mom2.moment().float().cpu(), int(st.mom2.count), describe(st.path, layer_name))
    return _COV[key]


def clear_cache() -> None:
    _COV.clear()


def check_cov(cov, hparams, key_sizes: dict) -> dict:
    """Given statistics {layer: C}: one square, finite matrix of the key width per edited layer."""
    if not isinstance(cov, dict):
        if len(hparams.layers) == 1 and isinstance(cov, torch.Tensor):
            cov = {hparams.layers[0]: cov}
        else:
            raise ValueError("cov must map each edited layer to its second moment C: {layer: tensor}")
    missing = [l for l in hparams.layers if l not in cov]
    if missing:
        raise ValueError(f"no statistics for edited layer(s) {missing}: cov has layers {sorted(cov)}")
    out = {}
    for l in hparams.layers:
        c, d = cov[l], key_sizes[l]
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != (d, d):
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"statistics of layer {l} have shape {shape}, but its keys are {d} wide: "
                             f"C must be {d}x{d}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"statistics of layer {l} contain NaN or Inf")
        out[l] = c
    return out


def layer_covs(model, tok, hparams, key_sizes: dict, stats_dir, corpus, cov=None, progress=True) -> dict:
    """{layer: C} for the reference path: the given `cov`, or each layer's statistics."""
    if cov is not None:
        device = next(model.parameters()).device
        return {l: c.to(device, torch.float32) for l, c in check_cov(cov, hparams, key_sizes).items()}
    _refuse_half_stats(hparams)
    a = adapter_for(model)
    device = next(model.parameters()).device
    covs = {}
    for l in hparams.layers:
        c, count, where = _moment(model, tok, a.rewrite_name(l), hparams.mom2_dataset, hparams.mom2_n_samples,
                                  hparams.mom2_dtype, False, stats_dir, corpus, progress)
        check_key_count(count, key_sizes[l], where, hparams.mom2_ridge)  # as on the fast path
        covs[l] = c.to(device)
    if hparams.mom2_ridge is not None:  # as covariance.edit_covariance regularises the fast path's C
        covs = {l: c + (hparams.mom2_ridge * c.diagonal().mean()) * torch.eye(c.shape[0], dtype=c.dtype,
                                                                             device=c.device)
                for l, c in covs.items()}
    return covs


def _refuse_half_stats(hparams):
    if hparams.mom2_act_dtype not in (None, "float32"):
        raise ValueError("hparams.mom2_act_dtype is a fast-backend option: the reference backend "
                         "collects its statistics as the reference does (use backend='fast')")


def collect_missing_stats(model, tok, hparams, stats_dir, corpus, progress=True):
    """({layer: module name}, {layer: statistics file} (none without stats_dir), the collector's
    keyword arguments after `layer_names, stats_dir`): the files of every edited layer that are
    missing are collected in one pass (stopped at the deepest edited layer) and written."""
    from ..fast_stats import layer_stats_fast

    names = {l: adapter_for(model).rewrite_name(l) for l in hparams.layers}
    collect = dict(ds_name=corpus_ds_name(corpus, hparams.mom2_dataset), sample_size=hparams.mom2_n_samples,
                   precision=hparams.mom2_dtype, corpus=corpus, model_name=stats_model_name(model),
                   progress=progress, act_dtype=hparams.mom2_act_dtype)
    paths = {}
    if stats_dir is not None:
        maxlen = context_length(model)
        paths = {l: stats_path(stats_dir, collect["model_name"], collect["ds_name"], n, hparams.mom2_dtype, ("mom2",),
                               hparams.mom2_n_samples, 3 * maxlen, maxlen, hparams.mom2_act_dtype)
                 for l, n in names.items()}
        missing = [names[l] for l, p in paths.items() if not p.is_file()]
        if missing:
            layer_stats_fast(model, tok, missing, stats_dir, **collect)
    return names, paths, collect


def layer_factors(model, tok, hparams, key_sizes: dict, stats_dir, corpus, cov=None, progress=True,
                  device=None) -> dict:
    """{layer: CovarianceFactor} for the fast path. Statistics files that are missing are collected
    for all layers in one pass (stopped at the deepest edited layer) and written; the factors are
    then read from the shared cache (keyed by model, layer and statistics file) or factored."""
    from ..fast_stats import layer_stats_fast

    device = device or next(model.parameters()).device
    if cov is not None:
        return {l: CovarianceFactor(c, device=device) for l, c in check_cov(cov, hparams, key_sizes).items()}
    stats_dir = default_stats(stats_dir, corpus)
    names, _, collect = collect_missing_stats(model, tok, hparams, stats_dir, corpus, progress)
    model_name, ds_name = collect["model_name"], collect["ds_name"]
    if stats_dir is not None:
        return {l: layer_factor(model, tok, hparams, l, stats_dir, corpus, progress, device) for l in hparams.layers}
    # an in-memory corpus: no files; at the first factor not cached, one pass for every layer, and
    # the same checks as a file's statistics (key count, positive definiteness, ridge)
    a = adapter_for(model)
    got = {}

    def factor(name):
        if name not in got:
            todo = [n for n in names.values() if n not in got]
            got.update({n: s.mom2 for n, s in layer_stats_fast(model, tok, todo, None, **collect).items()})
        return edit_covariance(got[name], a.linear_io(name)[0], describe(None, name), hparams.mom2_ridge,
                               device)[1]

    return {l: get_factor(("memit-in-memory", model_name, names[l], id(corpus), ds_name, hparams.mom2_n_samples,
                           hparams.mom2_dtype, hparams.mom2_act_dtype, hparams.mom2_ridge),
                          lambda n=names[l]: factor(n), device=device)
            for l in hparams.layers}
