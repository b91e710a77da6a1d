"""The "fast" ROME backend (DESIGN.md §4): the reference's edit (REFERENCE.md §2) with exact savings.

Per edited layer:
* one forward over the context templates, stopped after the rewrite module, gives k̄ (their mean
  key), k* and y* (row 0 is the bare prompt: the first context template is "{}") and, for r-ROME,
  ȳ — the reference runs the whole model twice for these;
* δ from `fast_compute_v.optimize_value` (prefix keys/values cached, suffixes only, logits only
  where the loss reads them);
* u and the update from the cached `CovarianceFactor` of C (fp64 Cholesky, keyed by model, layer
  and statistics file) and the fused `rome_update_`, in place, in the weight's dtype with fp32
  sums, no d_k×d_v update materialised.

`execute_rome_fast(..., apply=True)` leaves the edit in the model (what apply_rome_to_model asks
for: no snapshot, restore and re-add as the reference does); with apply=False (execute_rome's
contract) the touched weights are restored bit for bit. `apply_rome_batch` applies n independent
requests as one rank-n update (MEMIT-style batching on ROME's per-edit solve)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import adapter_for
from .compute_u import module_io_at
from .compute_v import ValueInfo
from .corpus import local_corpus
from .fast_compute_v import optimize_value
from .rome import KEY_MODES, _rewrite, normalize_request, prepare_edit, register_backend, weight_layout
from .solve_update import factor_key, get_factor, rank_k_update_, rome_update_
from .stats import corpus_ds_name, context_length, default_stats_dir, stats_model_name, stats_path
from .templates import get_context_templates


def layer_factor(model, tok, hparams, layer: int, stats_dir, corpus, progress=True, device=None):
    """The cached factor of C = E[kkᵀ] for `layer`: statistics are read (or collected, by the
    one-pass collector) only on a cache miss."""
    from .fast_stats import layer_stats_fast

    layer_name = hparams.rewrite_module_tmp.format(layer)
    model_name = stats_model_name(model)
    corpus = local_corpus(corpus, hparams.mom2_dataset)  # mom2_dataset may be a text file
    ds_name = corpus_ds_name(corpus, hparams.mom2_dataset)
    path = None
    if stats_dir is not None:
        path = stats_path(stats_dir, model_name, ds_name, layer_name, hparams.mom2_dtype, ("mom2",),
                          hparams.mom2_n_samples, context_length(model) * 3, context_length(model),
                          hparams.mom2_act_dtype)
    def load():
        st = layer_stats_fast(model, tok, layer_name, stats_dir, ds_name, sample_size=hparams.mom2_n_samples,
                              precision=hparams.mom2_dtype, corpus=corpus, model_name=model_name,
                              progress=progress, act_dtype=hparams.mom2_act_dtype)
        return st.mom2.moment()

    if path is not None and not path.is_file():
        load()  # collect and write the file first, so the factor is keyed by the file as written
    # an in-memory corpus has no file: key it by the object (and the sample size)
    where = None if path is not None else (str(corpus) if isinstance(corpus, (str, Path)) else id(corpus))
    key = (factor_key(model_name, layer_name, path), where, ds_name, hparams.mom2_n_samples, hparams.mom2_dtype,
           hparams.mom2_act_dtype)
    return get_factor(key, load, device=device or next(model.parameters()).device)


def _layer_pieces(model, tok, request, hparams, layer, context_templates, key_mode, adapter):
    """k̄, the insertion key and residual target (k*, y* or k̄, ȳ), and the value optimisation."""
    rewrite = hparams.rewrite_module_tmp.format(layer)
    templates = [c.format(request["prompt"]) for c in context_templates]
    bare_first = context_templates[0] == "{}"
    ks, ys = module_io_at(model, tok, rewrite, templates if bare_first else templates + [request["prompt"]],
                          request["subject"], hparams.fact_token, stop=True)
    k_star, y_star = ks[0], ys[0]
    if not bare_first:
        k_star, y_star, ks, ys = ks[-1], ys[-1], ks[:-1], ys[:-1]
    k_bar = ks.mean(0)
    if key_mode == "r-rome":
        k_star, y_star = k_bar, ys.mean(0)  # the module is affine: ȳ = W k̄ + b
    v_init, delta, losses, steps, lookup = optimize_value(model, tok, request, hparams, layer,
                                                          context_templates, adapter)
    return k_bar, k_star.float(), y_star.float(), v_init, delta, losses, steps, lookup


def execute_rome_fast(model, tok, request: dict, hparams, context_templates=None, stats_dir=None,
                      corpus=None, key_mode: str = "reference", inv_cov=None, seed: int = 0,
                      return_info: bool = False, progress: bool = True, apply: bool = False):
    """execute_rome's contract ({weight_name: (u, right)}, model left unchanged) on the fast path;
    apply=True keeps the update in the model (apply_rome_to_model's use)."""
    request, context_templates, stats_dir, targets = prepare_edit(
        model, tok, request, hparams, context_templates, stats_dir, corpus, key_mode, seed)
    adapter = adapter_for(model)
    saved = {} if apply else {n: model.get_parameter(n).detach().clone() for n, _ in targets.values()}
    deltas, infos = {}, {}
    try:
        for layer, (w_name, module) in targets.items():
            k_bar, k_star, y_star, v_init, delta, losses, steps, lookup = _layer_pieces(
                model, tok, request, hparams, layer, context_templates, key_mode, adapter)
            v_star = v_init + delta
            W = model.get_parameter(w_name)
            layout = weight_layout(module, W, k_bar.numel())
            ic = inv_cov.get(layer) if isinstance(inv_cov, dict) else inv_cov
            with torch.no_grad():
                if hparams.mom2_adjustment and ic is None:
                    fac = layer_factor(model, tok, hparams, layer, stats_dir, corpus, progress, W.device)
                    u, right = rome_update_(W, fac, k_bar.float(), k_star, v_star - y_star, layout)
                else:  # a given C⁻¹ (as execute_rome's inv_cov), or no covariance adjustment
                    u = k_bar.float() if ic is None else ic.to(W.device, torch.float32) @ k_bar.float()
                    u = u / u.norm()
                    right = (v_star - y_star) / torch.dot(k_star, u)
                    rank_k_update_(W, u, right, layout)
            deltas[w_name] = (u.detach(), right.detach())
            if return_info:
                infos[w_name] = ValueInfo(k_star, y_star, v_init, delta, v_star, right,
                                          float(torch.dot(k_star, u)), losses, steps, lookup,
                                          u=u, k_bar=k_bar)
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_parameter(name).copy_(w)
    return (deltas, infos) if return_info else deltas


execute_rome_fast.edits_in_place = True  # apply_rome_to_model: call with apply=True, add nothing


def apply_rome_batch(model, tok, requests, hparams, context_templates=None, stats_dir=None,
                     corpus=None, key_mode: str = "reference", seed: int = 0, progress: bool = True,
                     return_orig_weights: bool = False):
    """n independent requests as one rank-n update per layer: every request's k̄, k*, v* − y* is
    computed on the unedited model, then W += U Rᵀ in one fused call (the same as applying the n
    rank-one updates, each computed on the unedited model, one by one). Single-layer hparams only
    (a multi-layer edit computes upper layers on the lower layers' update). Returns
    (model, orig_weights, {weight_name: (U [d_k, n], R [d_v, n])})."""
    if len(set(hparams.layers)) != 1:
        raise ValueError("apply_rome_batch edits one layer; got layers " + str(hparams.layers))
    if not hparams.mom2_adjustment:
        raise ValueError("apply_rome_batch needs mom2_adjustment (the factor of C)")
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key_mode {key_mode!r}: one of {KEY_MODES}")
    if isinstance(requests, dict):
        requests = [requests]
    requests = [normalize_request(r) for r in requests]
    if not requests:
        raise ValueError("no requests")
    if context_templates is None:
        context_templates = get_context_templates(model, tok, hparams.context_template_length_params, seed)
    if stats_dir is None and not isinstance(corpus, (list, tuple)):
        stats_dir = default_stats_dir()
    layer = hparams.layers[0]
    adapter = adapter_for(model)
    w_name, module = _rewrite(model, hparams, layer)
    kb, ks, rs = [], [], []
    for r in requests:
        k_bar, k_star, y_star, v_init, delta, *_ = _layer_pieces(model, tok, r, hparams, layer,
                                                                 context_templates, key_mode, adapter)
        kb.append(k_bar.float())
        ks.append(k_star)
        rs.append(v_init + delta - y_star)
    W = model.get_parameter(w_name)
    orig = {w_name: W.detach().clone()} if return_orig_weights else {}
    fac = layer_factor(model, tok, hparams, layer, stats_dir, corpus, progress, W.device)
    with torch.no_grad():
        U, R = rome_update_(W, fac, torch.stack(kb, 1), torch.stack(ks, 1), torch.stack(rs, 1),
                            weight_layout(module, W, kb[0].numel()))
    return model, orig, {w_name: (U, R)}


register_backend("fast", execute_rome_fast)
