"""The "fast" ROME backend ("rome", "fast"): the reference backend's edit with exact savings only
(docs/editing.md, "The fast backend").

Per edited layer:
* one forward over the context templates, stopped after the rewrite module, gives k̄ (their mean
  key), k* and y* (row 0 is the bare prompt: the first context template is "{}") and, for r-ROME,
  ȳ — the reference runs the whole model twice for these;
* δ from `fast_compute_v.optimize_value` (prefix keys/values cached, suffixes only, logits only
  where the loss reads them);
* u and the update from the cached `CovarianceFactor` of C (fp64 Cholesky, keyed by model, layer
  and statistics file, checked when it is built) and the fused `rome_update_`, in place, in the
  weight's dtype with fp32 sums, no d_k×d_v update materialised.

`edit` leaves each request's update in the model as it computes it (no snapshot, restore and
re-add as the reference does; `apply_edits` keeps the one snapshot that makes a failure safe);
`compute` (execute_rome_fast, execute_rome's contract) restores the touched weights bit for bit.
`apply_rome_batch` applies n independent requests as one rank-n update (MEMIT-style batching on
ROME's per-edit solve)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import adapter_for
from .backend import WeightDelta, apply_edits, register_backend, restore_weights
from .compute_u import module_io_at
from .compute_v import ValueInfo
from .corpus import local_corpus
from .covariance import describe, edit_covariance
from .fast_compute_v import optimize_value
from .fast_stats import layer_stats_fast
from .rome import ROMEBackend, execute_with
from .solve_update import CovarianceFactor, factor_key, get_factor, rank_k_update_, rome_update_
from .stats import context_length, corpus_ds_name, stats_model_name, stats_path


def layer_factor(model, tok, hparams, layer: int, stats_dir, corpus, progress=True, device=None):
    """The cached, checked factor of C = E[kkᵀ] for `layer`: statistics are read (or collected,
    by the one-pass collector) and checked (covariance.py) only on a cache miss."""
    a = adapter_for(model)
    layer_name = a.rewrite_name(layer)
    model_name = stats_model_name(model)
    corpus = local_corpus(corpus, hparams.mom2_dataset)  # mom2_dataset may be a text file
    ds_name = corpus_ds_name(corpus, hparams.mom2_dataset)
    device = device or next(model.parameters()).device
    path = None
    if stats_dir is not None:
        path = stats_path(stats_dir, model_name, ds_name, layer_name, hparams.mom2_dtype, ("mom2",),
                          hparams.mom2_n_samples, context_length(model) * 3, context_length(model),
                          hparams.mom2_act_dtype)

    def stats():
        return layer_stats_fast(model, tok, layer_name, stats_dir, ds_name, sample_size=hparams.mom2_n_samples,
                                precision=hparams.mom2_dtype, corpus=corpus, model_name=model_name,
                                progress=progress, act_dtype=hparams.mom2_act_dtype)

    def load():
        st = stats()
        return edit_covariance(st.mom2, a.linear_io(layer_name)[0], describe(st.path, layer_name),
                               hparams.mom2_ridge, device)[1]

    if path is not None and not path.is_file():
        stats()  # collect and write the file first, so the factor is keyed by the file as written
    # an in-memory corpus has no file: key it by the object (and the sample size)
    where = None if path is not None else (str(corpus) if isinstance(corpus, (str, Path)) else id(corpus))
    key = (factor_key(model_name, layer_name, path), where, ds_name, hparams.mom2_n_samples, hparams.mom2_dtype,
           hparams.mom2_act_dtype, hparams.mom2_ridge)
    return get_factor(key, load, device=device)


def _layer_pieces(model, tok, request, hparams, site, context_templates, key_mode, adapter):
    """k̄, the insertion key and residual target (k*, y* or k̄, ȳ), and the value optimisation."""
    templates = [c.format(request["prompt"]) for c in context_templates]
    bare_first = context_templates[0] == "{}"
    ks, ys = module_io_at(model, tok, site.rewrite, templates if bare_first else templates + [request["prompt"]],
                          request["subject"], hparams.fact_token, stop=True)
    k_star, y_star = ks[0], ys[0]
    if not bare_first:
        k_star, y_star, ks, ys = ks[-1], ys[-1], ks[:-1], ys[:-1]
    k_bar = ks.mean(0)
    if key_mode == "r-rome":
        k_star, y_star = k_bar, ys.mean(0)  # the module is affine: ȳ = W k̄ + b
    v_init, delta, losses, steps, lookup = optimize_value(model, tok, request, hparams, site.layer,
                                                          context_templates, adapter)
    return k_bar, k_star.float(), y_star.float(), v_init, delta, losses, steps, lookup


class FastROME(ROMEBackend):
    name = "fast"

    def covariance(self, model, tok, hparams, site, stats_dir, corpus, progress):
        return layer_factor(model, tok, hparams, site.layer, stats_dir, corpus, progress)

    def compute(self, model, tok, requests, hparams, sites, **kw):
        saved = {s.weight: model.get_parameter(s.weight).detach().clone() for s in sites}
        try:
            return self.edit(model, tok, requests, hparams, sites, **kw)
        finally:
            restore_weights(model, saved)

    def edit(self, model, tok, requests, hparams, sites, context_templates, key_mode, covariance,
             progress=True):
        (request,) = requests
        adapter = adapter_for(model)
        deltas = []
        for site in sites:
            k_bar, k_star, y_star, v_init, delta, losses, steps, lookup = _layer_pieces(
                model, tok, request, hparams, site, context_templates, key_mode, adapter)
            v_star = v_init + delta
            W = model.get_parameter(site.weight)
            cov = covariance[site.layer]
            with torch.no_grad():
                if isinstance(cov, CovarianceFactor):
                    u, right = rome_update_(W, cov, k_bar.float(), k_star, v_star - y_star, site.layout)
                else:  # a given C⁻¹ (as execute_rome's inv_cov), or no covariance adjustment
                    u = k_bar.float() if cov is None else cov.to(W.device, torch.float32) @ k_bar.float()
                    u = u / u.norm()
                    right = (v_star - y_star) / torch.dot(k_star, u)
                    rank_k_update_(W, u, right, site.layout)
            info = ValueInfo(k_star, y_star, v_init, delta, v_star, right, float(torch.dot(k_star, u)),
                             losses, steps, lookup, u=u, k_bar=k_bar)
            deltas.append(WeightDelta(site.weight, u.detach(), right.detach(), site.layout, info))
        return deltas


FAST = register_backend(FastROME())


def execute_rome_fast(model, tok, request: dict, hparams, context_templates=None, stats_dir=None,
                      corpus=None, key_mode: str = "reference", inv_cov=None, seed: int = 0,
                      return_info: bool = False, progress: bool = True):
    """execute_rome's contract ({weight_name: (u, right)}, the model left unchanged) on the fast
    backend."""
    return execute_with(FAST, model, tok, request, hparams, return_info, context_templates=context_templates,
                        stats_dir=stats_dir, corpus=corpus, key_mode=key_mode, inv_cov=inv_cov, seed=seed,
                        progress=progress)


class BatchedROME(FastROME):
    """n independent requests as one rank-n update of one layer (not registered: it changes what
    a list of requests means, see apply_rome_batch)."""
    name = "fast-batched"
    batches = True

    def prepare(self, model, tok, requests, hparams, **kw):
        if len(set(hparams.layers)) != 1:
            raise ValueError("apply_rome_batch edits one layer; got layers " + str(hparams.layers))
        if not hparams.mom2_adjustment:
            raise ValueError("apply_rome_batch needs mom2_adjustment (the factor of C)")
        return super().prepare(model, tok, requests, hparams, **kw)

    def edit(self, model, tok, requests, hparams, sites, context_templates, key_mode, covariance,
             progress=True):
        (site,) = sites
        adapter = adapter_for(model)
        kb, ks, rs = [], [], []
        for r in requests:  # all on the unedited model
            k_bar, k_star, y_star, v_init, delta, *_ = _layer_pieces(model, tok, r, hparams, site,
                                                                     context_templates, key_mode, adapter)
            kb.append(k_bar.float())
            ks.append(k_star)
            rs.append(v_init + delta - y_star)
        W = model.get_parameter(site.weight)
        with torch.no_grad():
            U, R = rome_update_(W, covariance[site.layer], torch.stack(kb, 1), torch.stack(ks, 1),
                                torch.stack(rs, 1), site.layout)
        return [WeightDelta(site.weight, U, R, site.layout)]


def apply_rome_batch(model, tok, requests, hparams, context_templates=None, stats_dir=None,
                     corpus=None, key_mode: str = "reference", seed: int = 0, progress: bool = True,
                     return_orig_weights: bool = False):
    """n independent requests as one rank-n update per layer: every request's k̄, k*, v* − y* is
    computed on the unedited model, then W += U Rᵀ in one fused call (the same as applying the n
    rank-one updates, each computed on the unedited model, one by one). Single-layer hparams only
    (a multi-layer edit computes upper layers on the lower layers' update). Returns
    (model, orig_weights, {weight_name: (U [d_k, n], R [d_v, n])})."""
    model, orig, deltas = apply_edits(model, tok, requests, hparams, "rome", BatchedROME(),
                                      return_orig_weights=return_orig_weights,
                                      context_templates=context_templates, stats_dir=stats_dir, corpus=corpus,
                                      key_mode=key_mode, seed=seed, progress=progress)
    return model, orig, {d.name: (d.U, d.R) for d in deltas}
