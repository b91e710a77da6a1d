"""MEMIT (Meng et al. 2023): many facts written into several MLP layers at once; the reference path
(`execute_memit`, the test oracle) and the one entry point of every backend,
`apply_memit_to_model`.

For a batch of n requests and edited layers l_0 < … < l_{m−1} (the z layer L = l_{m−1}):
1. z_j per request (`compute_z`), on the model as it is at the call;
2. for i = 0 … m−1, on the model with layers l_0 … l_{i−1} already updated:
   K = the template-averaged keys at l_i (`compute_ks`), H = block L's output for the bare
   prompts, R_i = (Z − H)/(m − i) (the residual spread over the layers left),
   X = (λC + KKᵀ)⁻¹K in float64, and W_{l_i} += R_i Xᵀ;
3. the weights are restored and the deltas returned as {weight_name: (X, R_i)};
   `apply_memit_to_model` adds them back."""
from __future__ import annotations

import time

import torch

from ...models import adapter_for
from ..backend import EditBackend, WeightDelta, apply_edits, register_backend
from ..sites import edit_sites
from ..rome import normalize_request
from .compute_ks import compute_ks, residual_at_z_layer
from .compute_z import compute_z
from .hparams import MEMITHyperParams, check_layers
from .solve import check_lambda, solve_reference
from .stats import default_stats, layer_covs
from .templates import check_templates, get_context_templates


def check_memit_requests(model, requests, hparams) -> list[dict]:
    """Normalised copies of the requests (target with a leading space), after checking the batch
    and the hyperparameters against the model; ValueError naming the problem otherwise."""
    if not isinstance(hparams, MEMITHyperParams):
        raise TypeError(f"MEMIT needs MEMITHyperParams, got {type(hparams).__name__}")
    out = normalize_requests(requests)
    check_layers(hparams, adapter_for(model).num_layers)
    sites = edit_sites(model, hparams)  # the hparams' module names checked against the adapter's
    seen = {}
    for i, r in enumerate(out):
        key = (r["subject"], r["prompt"])
        if key in seen and out[seen[key]]["target_new"]["str"] != r["target_new"]["str"]:
            j = seen[key]
            raise ValueError(f"requests {j} and {i} conflict: both rewrite {r['prompt'].format(r['subject'])!r}, "
                             f"to {out[j]['target_new']['str']!r} and to {r['target_new']['str']!r}; MEMIT fits "
                             "a batch jointly, so drop one of them (or edit them in separate calls)")
        seen.setdefault(key, i)
    if hparams.USES_LAMBDA:
        check_lambda(float(hparams.mom2_update_weight), len(out), sites[0].key_size)
    return out


def normalize_requests(requests, where: str = "") -> list[dict]:
    """Normalised copies of a non-empty list of requests; ValueError naming the bad one."""
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError(f"{where}no requests to edit: MEMIT needs a non-empty list of requests")
    out = []
    for i, r in enumerate(requests):
        try:
            out.append(normalize_request(r))
        except ValueError as exc:
            raise ValueError(f"{where}request {i}: {exc}") from None
    return out


def weight_names(model, hparams) -> list[str]:
    """The edited weights, in hparams.layers' (ascending) order, from the model's adapter."""
    return [s.weight for s in edit_sites(model, hparams)]


def prepare(model, tok, hparams, context_templates, seed):
    """(adapter, the weights' layout, template groups, {layer: key width}) of a call."""
    adapter = adapter_for(model)
    templates = (check_templates(context_templates) if context_templates is not None
                 else get_context_templates(model, tok, seed))
    return adapter, adapter.weight_layout, templates, {s.layer: s.key_size for s in edit_sites(model, hparams)}


def execute_memit(model, tok, requests, hparams, *, context_templates=None, stats_dir=None, corpus=None,
                  cov=None, seed: int = 0, progress: bool = True, return_info: bool = False):
    """{weight_name: (X [d_k, n], R_i [d_v, n])} in float64 on the CPU; the model is left as it was.

    context_templates: the two template groups (default: sampled from the model, seeded, cached).
    stats_dir / corpus: the statistics cache and the text to collect it from (default
    $ROME_FAST_CACHE/stats and hparams.mom2_dataset); cov: {layer: C} instead. With
    return_info=True also returns {"z": [ZInfo per request], "layers": {layer: {...}}, "seconds":
    {"setup", "z", "layers"}}."""
    clock = [time.perf_counter()]
    requests = check_memit_requests(model, requests, hparams)
    adapter, layout, templates, d_k = prepare(model, tok, hparams, context_templates, seed)
    # statistics first, so a missing or malformed file fails before the long z optimisation
    covs = layer_covs(model, tok, hparams, d_k, default_stats(stats_dir, corpus), corpus, cov, progress)
    clock.append(time.perf_counter())
    names = weight_names(model, hparams)
    weights = {n: model.get_parameter(n) for n in names}
    saved = {n: w.detach().clone() for n, w in weights.items()}
    lam = float(hparams.mom2_update_weight)
    deltas, info = {}, {"z": [], "layers": {}}
    try:
        zinfo = [compute_z(model, tok, r, hparams, hparams.z_layer, templates, return_info=True)[1]
                 for r in requests]
        info["z"] = zinfo
        clock.append(time.perf_counter())
        Z = torch.stack([z.z for z in zinfo], 1)                                # [d, n]
        m = len(hparams.layers)
        for i, (layer, name) in enumerate(zip(hparams.layers, names)):
            K = compute_ks(model, tok, requests, hparams, layer, templates).T    # [d_k, n]
            H = residual_at_z_layer(model, tok, requests, hparams).T            # [d, n]
            X = solve_reference(covs[layer], K, lam)
            R = (Z - H).double() / (m - i)
            with torch.no_grad():
                weights[name][...] = saved[name] + _in_layout(R @ X.T, layout).to(saved[name].dtype)
            deltas[name] = (X.detach().cpu(), R.detach().cpu())
            info["layers"][layer] = {"K": K.detach().cpu(), "residual_norm": (Z - H).norm(dim=0).cpu()}
        clock.append(time.perf_counter())
        info["seconds"] = dict(setup=clock[1] - clock[0], z=clock[2] - clock[1], layers=clock[3] - clock[2])
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                weights[n].copy_(w)
    return (deltas, info) if return_info else deltas


def _in_layout(upd: torch.Tensor, layout: str) -> torch.Tensor:
    """ΔW = R Xᵀ is [d_v, d_k]: as is for an (out, in) weight, transposed for GPT-2's Conv1D."""
    return upd if layout == "out_in" else upd.T


class MEMITBackend(EditBackend):
    """What both MEMIT backends share: the batch check (the weights they change: the protocol's
    default, every edited layer's rewrite weight)."""
    method = "memit"
    batches = True

    def check_requests(self, model, tok, requests, hparams) -> list:
        return check_memit_requests(model, requests, hparams)


class MEMITReference(MEMITBackend):
    name = "reference"

    def compute(self, model, tok, requests, hparams, return_info: dict | None = None, **kw) -> list[WeightDelta]:
        """return_info: a dict to fill with the z step's ZInfo list ("z") and per-layer details."""
        layout = adapter_for(model).weight_layout
        deltas, info = execute_memit(model, tok, requests, hparams, return_info=True, **kw)
        if return_info is not None:
            return_info.update(info)
        return [WeightDelta(n, X, R, layout) for n, (X, R) in deltas.items()]

    def edit(self, model, tok, requests, hparams, **kw) -> list[WeightDelta]:
        """As the reference re-adds them: each X Rᵀ formed in float64, cast and added."""
        deltas = self.compute(model, tok, requests, hparams, **kw)
        with torch.no_grad():
            for d in deltas:
                W = model.get_parameter(d.name)
                W += _in_layout(d.R.to(W.device) @ d.U.to(W.device).T, d.layout).to(W.dtype)
        return deltas


register_backend(MEMITReference())


def apply_memit_to_model(model, tok, requests, hparams, copy: bool = False, return_orig_weights: bool = False,
                         backend: str = "fast", **kw):
    """Edit `model` with all `requests` at once. Returns (model, orig_weights): clones of the
    changed weights taken before the edit when return_orig_weights=True (else {}); copy=True
    edits a deep copy. Every request is checked first; on any error (Ctrl-C included) the
    weights are put back. kw: context_templates, stats_dir, corpus, cov, seed, progress, and for
    the fast backend z_batch (requests optimised together) and z_checkpoint (a folder that keeps
    the finished target vectors, so a call cut short resumes its z step)."""
    model, orig, _ = apply_edits(model, tok, requests, hparams, "memit", backend, copy=copy,
                                 return_orig_weights=return_orig_weights, **kw)
    return model, orig
