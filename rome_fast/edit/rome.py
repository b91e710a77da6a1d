"""ROME's rank-one edit (REFERENCE.md §2.6): execute_rome computes (u, right) per edited weight
on a model it leaves unchanged; apply_rome_to_model applies requests one after another (each
computed on the model edited by the previous ones) and can return the original weights, which
restore_weights puts back bit for bit.

In y = W k terms the update is  Ŵ = W + (v* − y*) (C⁻¹k̄)ᵀ / (k*ᵀ C⁻¹ k̄),  so Ŵ k* + b = v*
and Ŵ k = W k for every key with kᵀ C⁻¹ k̄ = 0. key_mode="r-rome" (Gupta et al. 2024) uses the
template-averaged k̄ (and ȳ = W k̄ + b) in place of the bare-prompt k* (and y*), so the same key
builds the direction and is mapped to v*: Ŵ = W + (v* − ȳ)(C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄)."""
from __future__ import annotations

import copy as copy_module

import torch
from torch import nn

from .compute_u import compute_u
from .compute_v import compute_v
from .stats import default_stats_dir
from .templates import get_context_templates

KEY_MODES = ("reference", "r-rome")


# ---- requests ---------------------------------------------------------------------------------
def normalize_request(request: dict) -> dict:
    """A validated copy of a request in the reference's format, the target with a leading space:
    {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": {"str": " Rome"}}."""
    if not isinstance(request, dict):
        raise ValueError(f"a request is a dict with prompt, subject and target_new, not {type(request).__name__}")
    for key in ("prompt", "subject", "target_new"):
        if key not in request:
            raise ValueError(f"request is missing {key!r}: {request!r}")
    prompt, subject, target = request["prompt"], request["subject"], request["target_new"]
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"request subject must be a non-empty string, got {subject!r}")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        hint = (f" (the subject is already in it: write {prompt.replace(subject, '{}', 1)!r})"
                if isinstance(prompt, str) and subject in prompt else "")
        raise ValueError(f"request prompt must contain '{{}}' exactly once where the subject goes, "
                         f"got {prompt!r}{hint}")
    before = prompt.split("{}")[0]
    if before and not before.endswith(" "):
        raise ValueError(f"the text before '{{}}' in the prompt must end with a space: {prompt!r}")
    if isinstance(target, dict):
        target = target.get("str")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"request target_new must be a non-empty string (target_new['str']), got {target!r}")
    out = copy_module.deepcopy(request)
    out["target_new"] = dict(request["target_new"]) if isinstance(request["target_new"], dict) else {}
    out["target_new"]["str"] = target if target.startswith(" ") else " " + target
    return out


# ---- the update -------------------------------------------------------------------------------
def weight_layout(module: nn.Module, weight: torch.Tensor | None = None, d_in: int | None = None) -> str:
    """'out_in' for nn.Linear, 'in_out' for GPT-2's Conv1D; otherwise decided from the shape and
    the key width d_in, as the reference's upd_matrix_match_shape (ambiguous when square)."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D":
        return "in_out"
    w = module.weight if weight is None else weight
    if d_in is None or w.shape[0] == w.shape[1]:
        raise ValueError(f"cannot tell the layout of a {tuple(w.shape)} weight of {type(module).__name__}")
    return "in_out" if w.shape[0] == d_in else "out_in"


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
    """W += u ⊗ right in place (the fused kernel's contract). u: (d_in,), right: (d_out,)."""
    upd = update_matrix(u.to(W.device), right.to(W.device), layout)
    if upd.shape != W.shape:
        raise ValueError(f"update of shape {tuple(upd.shape)} does not fit the weight {tuple(W.shape)} "
                         f"({layout} layout)")
    W.add_(upd.to(W.dtype))
    return W


def prepare_edit(model, tok, request, hparams, context_templates, stats_dir, corpus, key_mode: str,
                 seed: int):
    """What every backend does first: check key_mode and the request, fetch the (seeded, cached)
    context templates, default the statistics cache, and find the weights to rewrite by layer."""
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key_mode {key_mode!r}: one of {KEY_MODES}")
    request = normalize_request(request)
    if context_templates is None:
        context_templates = get_context_templates(model, tok, hparams.context_template_length_params, seed)
    if stats_dir is None and not isinstance(corpus, (list, tuple)):
        stats_dir = default_stats_dir()
    targets = {layer: _rewrite(model, hparams, layer) for layer in sorted(set(hparams.layers))}
    return request, context_templates, stats_dir, targets


def _rewrite(model, hparams, layer):
    name = hparams.rewrite_module_tmp.format(layer)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r} (hparams.rewrite_module_tmp)") from None
    return f"{name}.weight", module


# ---- editing ----------------------------------------------------------------------------------
def execute_rome(model, tok, request: dict, hparams, context_templates=None, stats_dir=None,
                 corpus=None, key_mode: str = "reference", inv_cov=None, seed: int = 0,
                 return_info: bool = False, progress: bool = True):
    """{weight_name: (u, right)} for one request; the model is left as it was. Layers are edited
    in ascending order, each computed on the model with the lower layers' updates applied.
    inv_cov: C⁻¹ (a tensor, or {layer: tensor}) instead of loading statistics. stats_dir: the
    statistics cache, default $ROME_FAST_CACHE/stats (none for an in-memory list corpus)."""
    if hparams.mom2_act_dtype not in (None, "float32") and inv_cov is None:
        raise ValueError("hparams.mom2_act_dtype is a fast-backend option: the reference backend "
                         "collects its statistics as the reference does (use backend='fast')")
    request, context_templates, stats_dir, targets = prepare_edit(
        model, tok, request, hparams, context_templates, stats_dir, corpus, key_mode, seed)
    saved = {name: model.get_parameter(name).detach().clone() for name, _ in targets.values()}
    deltas, infos = {}, {}
    try:
        for layer, (w_name, module) in targets.items():
            ic = inv_cov.get(layer) if isinstance(inv_cov, dict) else inv_cov
            u, k_bar = compute_u(model, tok, request, hparams, layer, context_templates, stats_dir=stats_dir,
                                 corpus=corpus, inv_cov=ic, return_key=True, progress=progress)
            right, info = compute_v(model, tok, request, hparams, layer, u, context_templates,
                                    key_mode=key_mode, k_bar=k_bar, return_info=True)
            info.u, info.k_bar = u, k_bar
            W = model.get_parameter(w_name)
            rank_one_update(W, u, right, weight_layout(module, W, u.numel()))
            deltas[w_name] = (u.detach(), right.detach())
            infos[w_name] = info
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_parameter(name).copy_(w)
    return (deltas, infos) if return_info else deltas


_BACKENDS = {"reference": execute_rome}


def register_backend(name: str, execute_fn) -> None:
    """Make `apply_rome_to_model(..., backend=name)` use `execute_fn`, which has execute_rome's
    signature and returns {weight_name: (u, right)}."""
    _BACKENDS[name] = execute_fn


def apply_rome_to_model(model, tok, requests, hparams, copy: bool = False,
                        return_orig_weights: bool = False, context_templates=None, stats_dir=None,
                        key_mode: str = "reference", backend: str = "fast", **kw):
    """Apply ROME requests in sequence (request i+1 is computed on the model edited by 1…i).

    Returns (model, orig_weights): orig_weights maps weight names to clones taken before the
    first request when return_orig_weights=True (else {}); copy=True edits a deep copy.
    kw go to execute_rome: corpus, inv_cov, seed, progress."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: one of {sorted(_BACKENDS)}")
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key_mode {key_mode!r}: one of {KEY_MODES}")
    if isinstance(requests, dict):
        requests = [requests]
    requests = [normalize_request(r) for r in requests]  # fail before editing anything
    if copy:
        model = copy_module.deepcopy(model)
    if context_templates is None:
        context_templates = get_context_templates(model, tok, hparams.context_template_length_params,
                                                  kw.get("seed", 0))
    execute = _BACKENDS[backend]
    orig_weights = {}
    if getattr(execute, "edits_in_place", False):
        # the backend leaves each edit in the model itself (no snapshot / restore / re-add)
        names = [_rewrite(model, hparams, layer)[0] for layer in sorted(set(hparams.layers))]
        if return_orig_weights:
            orig_weights = {n: model.get_parameter(n).detach().clone() for n in names}
        for request in requests:
            execute(model, tok, request, hparams, context_templates=context_templates,
                    stats_dir=stats_dir, key_mode=key_mode, apply=True, **kw)
        return model, orig_weights
    for request in requests:
        deltas = execute(model, tok, request, hparams, context_templates=context_templates,
                         stats_dir=stats_dir, key_mode=key_mode, **kw)
        with torch.no_grad():
            for w_name, (u, right) in deltas.items():
                W = model.get_parameter(w_name)
                if return_orig_weights and w_name not in orig_weights:
                    orig_weights[w_name] = W.detach().clone()
                module = model.get_submodule(w_name.rsplit(".", 1)[0])
                rank_one_update(W, u, right, weight_layout(module, W, u.numel()))
    return model, orig_weights


@torch.no_grad()
def restore_weights(model, orig_weights: dict) -> None:
    """Copy the saved weights back (bitwise: a plain copy of the clones)."""
    for name, w in orig_weights.items():
        model.get_parameter(name).copy_(w)


from . import fast as _fast  # noqa: E402,F401  (registers the "fast" backend)
