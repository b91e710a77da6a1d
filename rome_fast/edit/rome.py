"""ROME's rank-one edit (docs/editing.md): what every ROME backend shares, the reference backend
("rome", "reference": plain PyTorch, the oracle of the fast one), and the entry points.

`execute_rome` computes {weight_name: (u, right)} for one request on a model it leaves unchanged;
`apply_rome_to_model` applies requests one after another (each computed on the model edited by
the previous ones) through `backend.apply_edits`: every request is checked and the statistics
are loaded and checked before anything is edited, and an exception or Ctrl-C part-way puts the
weights back as they were.

In y = W k terms the update is  Ŵ = W + (v* − y*) (C⁻¹k̄)ᵀ / (k*ᵀ C⁻¹ k̄),  so Ŵ k* + b = v*
and Ŵ k = W k for every key with kᵀ C⁻¹ k̄ = 0. key_mode="r-rome" (Gupta et al. 2024) uses the
template-averaged k̄ (and ȳ = W k̄ + b) in place of the bare-prompt k* (and y*), so the same key
builds the direction and is mapped to v*: Ŵ = W + (v* − ȳ)(C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄)."""
from __future__ import annotations

import torch

from ..models import adapter_for
from .backend import EditBackend, WeightDelta, apply_edits, register_backend, restore_weights
from .compute_u import compute_u, get_inv_cov
from .compute_v import compute_v
from .corpus import local_corpus
from .requests import KEY_MODES, check_key_mode, check_requests, normalize_request  # noqa: F401
from .sites import edit_sites
from .stats import corpus_ds_name, default_stats_dir
from .templates import get_context_templates, template_room


# ---- the update -------------------------------------------------------------------------------
def update_matrix(u: torch.Tensor, right: torch.Tensor, layout: str) -> torch.Tensor:
    """The rank-one update u ⊗ right as (d_in, d_out), transposed for an (out, in) weight."""
    m = u.float().unsqueeze(1) @ right.float().unsqueeze(0)
    if layout == "in_out":
        return m
    if layout == "out_in":
        return m.t()
    raise ValueError(f"unknown weight layout {layout!r}: 'in_out' or 'out_in'")


@torch.no_grad()
def rank_one_update(W: torch.Tensor, u: torch.Tensor, right: torch.Tensor, layout: str) -> torch.Tensor:
    """W += u ⊗ right in place, materialising the update as the reference does. u: (d_in,),
    right: (d_out,); layout as the model adapter's `weight_layout`."""
    upd = update_matrix(u.to(W.device), right.to(W.device), layout)
    if upd.shape != W.shape:
        raise ValueError(f"update of shape {tuple(upd.shape)} does not fit the weight {tuple(W.shape)} "
                         f"({layout} layout)")
    W.add_(upd.to(W.dtype))
    return W


# ---- what every ROME backend shares -----------------------------------------------------------
class ROMEBackend(EditBackend):
    """Requests, options, templates, sites and statistics, the same for every ROME backend; a
    subclass says how it gets a layer's covariance (`covariance`) and computes the edit."""
    method = "rome"
    batches = False

    def check_requests(self, model, tok, requests, hparams):
        return check_requests(tok, requests, hparams.fact_token, adapter_for(model).context_length,
                              template_room(hparams.context_template_length_params))

    def prepare(self, model, tok, requests, hparams, context_templates=None, stats_dir=None, corpus=None,
                key_mode: str = "reference", inv_cov=None, seed: int = 0, progress: bool = True) -> dict:
        """Options checked, the edited layers found, context templates sampled from the unedited
        model (seeded, cached), and each layer's statistics loaded and checked — all before the
        first value optimisation. inv_cov: C⁻¹ (a tensor, or {layer: tensor}) instead of
        statistics; stats_dir defaults to $ROME_FAST_CACHE/stats (none for an in-memory corpus)."""
        check_key_mode(key_mode)
        sites = edit_sites(model, hparams)
        if context_templates is None:
            context_templates = get_context_templates(model, tok, hparams.context_template_length_params, seed)
        if stats_dir is None and not isinstance(corpus, (list, tuple)):
            stats_dir = default_stats_dir()
        corpus = local_corpus(corpus, hparams.mom2_dataset)  # mom2_dataset may be a text file
        covariance = {}
        for site in sites:
            given = inv_cov.get(site.layer) if isinstance(inv_cov, dict) else inv_cov
            if given is not None:
                if tuple(given.shape) != (site.key_size, site.key_size):
                    raise ValueError(f"inverse second moment is {tuple(given.shape)} but the key width of "
                                     f"layer {site.layer} is {site.key_size}")
                if not bool(torch.isfinite(given).all()):
                    raise ValueError(f"the inverse second moment given for layer {site.layer} holds NaN or Inf")
                covariance[site.layer] = given
            elif hparams.mom2_adjustment:
                covariance[site.layer] = self.covariance(model, tok, hparams, site, stats_dir, corpus, progress)
            else:
                covariance[site.layer] = None
        return dict(sites=sites, context_templates=context_templates, key_mode=key_mode,
                    covariance=covariance, progress=progress)

    def covariance(self, model, tok, hparams, site, stats_dir, corpus, progress):
        """What this backend solves with for `site` (checked statistics; see covariance.py)."""
        raise NotImplementedError


def execute_with(backend: ROMEBackend, model, tok, request: dict, hparams, return_info: bool = False, **kw):
    """execute_rome's contract on any ROME backend: {weight_name: (u, right)} (and ValueInfos)."""
    requests = backend.check_requests(model, tok, [request], hparams)
    kw = backend.prepare(model, tok, requests, hparams, **kw)
    deltas = backend.compute(model, tok, requests, hparams, **kw)
    out = {d.name: (d.U[:, 0], d.R[:, 0]) for d in deltas}
    return (out, {d.name: d.info for d in deltas}) if return_info else out


# ---- the reference backend --------------------------------------------------------------------
class ReferenceROME(ROMEBackend):
    """The reference's arithmetic: C⁻¹ by `torch.inverse` in fp32, compute_u, compute_v on full
    forwards, the materialised outer product; `compute` edits the layers in ascending order and
    restores them (as the reference's execute_rome), `edit` then adds the deltas again."""
    name = "reference"

    def prepare(self, model, tok, requests, hparams, **kw):
        if hparams.mom2_act_dtype not in (None, "float32") and kw.get("inv_cov") is None:
            raise ValueError("hparams.mom2_act_dtype is a fast-backend option: the reference backend "
                             "collects its statistics as the reference does (use backend='fast')")
        return super().prepare(model, tok, requests, hparams, **kw)

    def covariance(self, model, tok, hparams, site, stats_dir, corpus, progress):
        return get_inv_cov(model, tok, site.rewrite, stats_dir, corpus_ds_name(corpus, hparams.mom2_dataset),
                           hparams.mom2_n_samples, hparams.mom2_dtype, corpus, progress=progress,
                           ridge=hparams.mom2_ridge)

    def compute(self, model, tok, requests, hparams, sites, context_templates, key_mode, covariance,
                progress=True):
        (request,) = requests
        saved = {s.weight: model.get_parameter(s.weight).detach().clone() for s in sites}
        deltas = []
        try:
            for site in sites:
                u, k_bar = compute_u(model, tok, request, hparams, site.layer, context_templates,
                                     inv_cov=covariance[site.layer], return_key=True, progress=progress)
                right, info = compute_v(model, tok, request, hparams, site.layer, u, context_templates,
                                        key_mode=key_mode, k_bar=k_bar, return_info=True)
                info.u, info.k_bar = u, k_bar
                rank_one_update(model.get_parameter(site.weight), u, right, site.layout)
                deltas.append(WeightDelta(site.weight, u.detach(), right.detach(), site.layout, info))
        finally:
            restore_weights(model, saved)
        return deltas

    def edit(self, model, tok, requests, hparams, **kw):
        deltas = self.compute(model, tok, requests, hparams, **kw)
        for d in deltas:
            rank_one_update(model.get_parameter(d.name), d.U[:, 0], d.R[:, 0], d.layout)
        return deltas


REFERENCE = register_backend(ReferenceROME())


# ---- entry points -----------------------------------------------------------------------------
def execute_rome(model, tok, request: dict, hparams, context_templates=None, stats_dir=None,
                 corpus=None, key_mode: str = "reference", inv_cov=None, seed: int = 0,
                 return_info: bool = False, progress: bool = True):
    """{weight_name: (u, right)} for one request on the reference backend; the model is left as
    it was. Layers are edited in ascending order, each computed on the model with the lower
    layers' updates applied. inv_cov: C⁻¹ (a tensor, or {layer: tensor}) instead of loading
    statistics. stats_dir: the statistics cache, default $ROME_FAST_CACHE/stats (none for an
    in-memory list corpus). With return_info=True also {weight_name: ValueInfo}."""
    return execute_with(REFERENCE, model, tok, request, hparams, return_info, context_templates=context_templates,
                        stats_dir=stats_dir, corpus=corpus, key_mode=key_mode, inv_cov=inv_cov, seed=seed,
                        progress=progress)


def apply_rome_to_model(model, tok, requests, hparams, copy: bool = False,
                        return_orig_weights: bool = False, context_templates=None, stats_dir=None,
                        key_mode: str = "reference", backend: str = "fast", **kw):
    """Apply ROME requests in sequence (request i+1 is computed on the model edited by 1…i).

    Returns (model, orig_weights): orig_weights maps weight names to clones taken before the
    first request when return_orig_weights=True (else {}); copy=True edits a deep copy.
    backend: a registered ROME backend ("fast", "reference", ...). kw: corpus, inv_cov, seed,
    progress. Every request and the statistics are checked before anything is edited; on any
    exception, KeyboardInterrupt included, the weights are restored before it propagates."""
    model, orig, _ = apply_edits(model, tok, requests, hparams, "rome", backend, copy=copy,
                                 return_orig_weights=return_orig_weights, context_templates=context_templates,
                                 stats_dir=stats_dir, key_mode=key_mode, **kw)
    return model, orig
