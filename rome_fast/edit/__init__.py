"""ROME editing (REFERENCE.md §2-3): the reference path and the fast backend (the default): hyperparameters, second-moment statistics,
context templates, compute_u / compute_v, the rank-one update, apply and restore.

    from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, restore_weights
    hp = ROMEHyperParams.from_name("smollm2-135m")
    model, orig = apply_rome_to_model(mt.model, mt.tokenizer, [request], hp,
                                      return_orig_weights=True, corpus="wiki.txt",
                                      stats_dir="stats")
    restore_weights(model, orig)
"""
from .compute_u import compute_u, get_inv_cov
from .compute_v import ValueInfo, compute_v
from .hparams import ROMEHyperParams, list_presets
from .rome import (apply_rome_to_model, execute_rome, normalize_request, rank_one_update,
                   register_backend, restore_weights, update_matrix, weight_layout)
from .stats import LayerStats, SecondMoment, layer_stats, load_stats_file, stats_path
from .fast import apply_rome_batch, execute_rome_fast
from .fast_compute_v import fast_compute_v
from .fast_stats import layer_stats_fast
from .templates import get_context_templates


def clear_caches() -> None:
    """Forget the process-wide caches (context templates, inverse second moments)."""
    from . import compute_u as _u, solve_update as _s, templates as _t
    _u.clear_cache()
    _s.clear_factor_cache()
    _t.clear_cache()


__all__ = ["LayerStats", "ROMEHyperParams", "SecondMoment", "ValueInfo", "apply_rome_batch",
           "apply_rome_to_model", "clear_caches", "compute_u", "compute_v", "execute_rome", "execute_rome_fast",
           "fast_compute_v", "get_context_templates",
           "get_inv_cov", "layer_stats", "layer_stats_fast", "list_presets", "load_stats_file", "normalize_request",
           "rank_one_update", "register_backend", "restore_weights", "stats_path",
           "update_matrix", "weight_layout"]
