"""The reference's `rome.rome_main`: `apply_rome_to_model`, `execute_rome`,
`upd_matrix_match_shape`, `get_context_templates`, on rome_fast's fast ROME backend (fp32 within
1e-4 of the reference algorithm, docs/editing.md)."""
from __future__ import annotations

from ...edit.rome import apply_rome_to_model as _apply_rome_to_model
from ...edit.rome import execute_rome as _execute_rome
from ...edit.templates import get_context_templates as _get_context_templates
from ..util import globals as _globals
from .layer_stats import explain_offline
from .rome_hparams import ROMEHyperParams


def apply_rome_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False):
    """(model, orig_weights): the requests applied in sequence; orig_weights holds the edited
    weights as they were (when return_orig_weights). On any error the weights are left as they were."""
    if isinstance(requests, dict):
        requests = [requests]
    with explain_offline(model, hparams, hparams.layers) as corpus:
        return _apply_rome_to_model(model, tok, requests, hparams, copy=copy,
                                    return_orig_weights=return_orig_weights,
                                    stats_dir=_globals.STATS_DIR, corpus=corpus)


def execute_rome(model, tok, request, hparams):
    """{weight_name: (u, right)} for one request; the model is unchanged on return."""
    with explain_offline(model, hparams, hparams.layers) as corpus:
        return _execute_rome(model, tok, request, hparams, stats_dir=_globals.STATS_DIR, corpus=corpus)


def upd_matrix_match_shape(matrix, shape):
    """`matrix` if it has `shape`, its transpose if that does, else a ValueError."""
    if matrix.shape == shape:
        return matrix
    if matrix.T.shape == shape:
        return matrix.T
    raise ValueError(f"the update matrix {tuple(matrix.shape)} matches neither the weight's shape "
                     f"{tuple(shape)} nor its transpose")


def get_context_templates(model, tok, length_params):
    """["{}"] + sampled prefixes + ". {}", generated once per model and cached (rome_fast seeds the
    sampling, so the templates are repeatable; the reference's are not)."""
    return _get_context_templates(model, tok, length_params)


__all__ = ["ROMEHyperParams", "apply_rome_to_model", "execute_rome", "get_context_templates",
           "upd_matrix_match_shape"]
