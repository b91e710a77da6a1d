"""AlphaEdit (Fang, Jiang et al. 2025): MEMIT's batch edit with every update projected into the null
space of the preserved keys, so sequential batches do not overwrite what the model knew. The
reference path (`execute_alphaedit`, the test oracle), its backend, and the entry point of both
backends, `apply_alphaedit_to_model`.

For a batch (MEMIT's z, keys, residual and layer order; docs/memit.md §2), at each edited layer l_i:

    X = solve(P(KKᵀ + K_pK_pᵀ) + αI, P K R_iᵀ)   (d_k × d_v, fp32, LU),   W += Xᵀ (in W's layout)

with P the layer's null-space projection (projection.py), K_pK_pᵀ the keys of every earlier batch
(`cache_c`), α = hparams.L2. After all layers are updated, each layer's keys of this batch are
re-extracted on the edited model and K Kᵀ is added to cache_c[layer]. Nothing is restored: the
edit stays in the model, and cache_c carries what the next batch must not overwrite."""
from __future__ import annotations

import time

import torch

from ..backend import EditBackend, WeightDelta, apply_edits, register_backend
from ..memit.compute_ks import compute_ks, residual_at_z_layer
from ..memit.compute_z import compute_z
from ..memit.main import check_memit_requests, prepare, weight_names
from .hparams import AlphaEditHyperParams
from .projection import get_project


def check_alphaedit_requests(model, requests, hparams) -> list[dict]:
    if not isinstance(hparams, AlphaEditHyperParams):
        raise TypeError(f"AlphaEdit needs AlphaEditHyperParams, got {type(hparams).__name__}")
    return check_memit_requests(model, requests, hparams)


def init_cache(cache_c, hparams, key_sizes: dict) -> dict:
    """cache_c with a zero d_k × d_k fp32 entry (on the CPU, as the reference) for every edited
    layer it lacks; a present entry must have the layer's key width."""
    if not isinstance(cache_c, dict):
        raise TypeError(f"cache_c must be a dict {{layer: K_pK_pᵀ}}, got {type(cache_c).__name__}")
    for l in hparams.layers:
        d = key_sizes[l]
        if l not in cache_c:
            cache_c[l] = torch.zeros(d, d)
        elif not isinstance(cache_c[l], torch.Tensor) or tuple(cache_c[l].shape) != (d, d):
            shape = tuple(cache_c[l].shape) if isinstance(cache_c[l], torch.Tensor) else type(cache_c[l]).__name__
            raise ValueError(f"cache_c[{l}] has shape {shape}, but layer {l}'s keys are {d} wide: it was "
                             "accumulated on another model or layer")
    return cache_c


def accumulate_keys(model, tok, requests, hparams, templates, cache_c, stop: bool = False) -> None:
    """cache_c[l] + KKᵀ of this batch's keys re-extracted on the edited model, for every layer.
    Entries are replaced, not changed in place, and only once all are computed, so a caller
    holding the old tensors can put them back after an interruption."""
    new = {}
    for l in hparams.layers:
        K = compute_ks(model, tok, requests, hparams, l, templates, stop=stop).T.float()
        new[l] = cache_c[l] + (K @ K.T).to(cache_c[l].device, cache_c[l].dtype)
    cache_c.update(new)


def _in_layout(X: torch.Tensor, layout: str) -> torch.Tensor:
    """X is [d_k, d_v]: the update is Xᵀ for an (out, in) weight, X itself for GPT-2's Conv1D."""
    return X.T if layout == "out_in" else X


def execute_alphaedit(model, tok, requests, hparams, cache_c: dict, *, context_templates=None, stats_dir=None,
                      corpus=None, cov=None, seed: int = 0, progress: bool = True,
                      return_info: dict | None = None) -> list[WeightDelta]:
    """Edit `model` in place with one batch, as the reference; cache_c gains the batch's keys.
    Returns the per-layer updates as WeightDeltas (ΔW = R Uᵀ with U = A⁻¹PK, fp32, CPU)."""
    clock = [time.perf_counter()]
    requests = check_alphaedit_requests(model, requests, hparams)
    adapter, layout, templates, d_k = prepare(model, tok, hparams, context_templates, seed)
    init_cache(cache_c, hparams, d_k)
    # P before the long z step, so bad statistics fail at once
    Ps = {l: get_project(model, tok, hparams, l, stats_dir, corpus, cov, progress) for l in hparams.layers}
    clock.append(time.perf_counter())
    zinfo = [compute_z(model, tok, r, hparams, hparams.z_layer, templates, return_info=True)[1] for r in requests]
    clock.append(time.perf_counter())
    Z = torch.stack([z.z for z in zinfo], 1)                                 # [d, n]
    m, alpha = len(hparams.layers), float(hparams.L2)
    deltas, layers = [], {}
    for i, (layer, name) in enumerate(zip(hparams.layers, weight_names(model, hparams))):
        K = compute_ks(model, tok, requests, hparams, layer, templates).T.float()       # [d_k, n]
        H = residual_at_z_layer(model, tok, requests, hparams).T                      # [d, n]
        R = ((Z - H) / (m - i)).float()
        P = Ps[layer]
        A = P @ (K @ K.T + cache_c[layer].to(K.device, torch.float32))
        A.diagonal().add_(alpha)
        LU, piv = torch.linalg.lu_factor(A)
        PK = P @ K
        X = torch.linalg.lu_solve(LU, piv, PK @ R.T)                                  # [d_k, d_v]
        W = model.get_parameter(name)
        with torch.no_grad():
            W += _in_layout(X, layout).to(W.dtype)
        deltas.append(WeightDelta(name, torch.linalg.lu_solve(LU, piv, PK).cpu(), R.cpu(), layout))
        layers[layer] = {"K": K.detach().cpu(), "residual_norm": (Z - H).norm(dim=0).cpu(),
                         "null_space_rank": round(float(P.diagonal().sum()))}
    accumulate_keys(model, tok, requests, hparams, templates, cache_c)
    clock.append(time.perf_counter())
    if return_info is not None:
        return_info.update(z=zinfo, layers=layers, seconds=dict(
            setup=clock[1] - clock[0], z=clock[2] - clock[1], layers=clock[3] - clock[2]))
    return deltas


class AlphaEditBackend(EditBackend):
    """What both AlphaEdit backends share: the batch check and the weights they change."""
    method = "alphaedit"
    batches = True

    def weight_names(self, model, hparams) -> list[str]:
        return weight_names(model, hparams)

    def check_requests(self, model, tok, requests, hparams) -> list:
        return check_alphaedit_requests(model, requests, hparams)

    def compute(self, model, tok, requests, hparams, cache_c: dict | None = None, **kw) -> list[WeightDelta]:
        """The batch's updates on the model as it is; the model and cache_c are left as they were."""
        names = weight_names(model, hparams)
        saved = {n: model.get_parameter(n).detach().clone() for n in names}
        try:
            return self.edit(model, tok, requests, hparams, cache_c=dict(cache_c or {}), **kw)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    model.get_parameter(n).copy_(w)


class AlphaEditReference(AlphaEditBackend):
    name = "reference"

    def edit(self, model, tok, requests, hparams, cache_c: dict | None = None, **kw) -> list[WeightDelta]:
        return execute_alphaedit(model, tok, requests, hparams, {} if cache_c is None else cache_c, **kw)


register_backend(AlphaEditReference())


def apply_alphaedit_to_model(model, tok, requests, hparams, cache_c: dict | None = None, copy: bool = False,
                             return_orig_weights: bool = False, backend: str = "fast", **kw):
    """Edit `model` with one batch of `requests`, projected into the null space of the preserved
    keys and of every earlier batch's keys. Returns (model, orig_weights, cache_c).

    cache_c: {layer: K_pK_pᵀ} of the batches before (None or {}: none); it is updated with this
    batch's keys (in place when given) and is what to pass to the next call of a sequential run.
    On any error (Ctrl-C included) both the weights and cache_c are put back as they were. kw as
    `apply_memit_to_model`'s: context_templates, stats_dir, corpus, cov, seed, progress,
    return_info, and for the fast backend z_batch and zs."""
    cache_c = {} if cache_c is None else cache_c
    before = dict(cache_c)  # entries are replaced, never changed in place: references suffice
    try:
        model, orig, _ = apply_edits(model, tok, requests, hparams, "alphaedit", backend, copy=copy,
                                     return_orig_weights=return_orig_weights, cache_c=cache_c, **kw)
    except BaseException:
        cache_c.clear()
        cache_c.update(before)
        raise
    return model, orig, cache_c
