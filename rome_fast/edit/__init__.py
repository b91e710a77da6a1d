"""Knowledge editing (docs/editing.md): ROME with a reference backend (plain PyTorch, the
oracle) and a fast backend (the default), behind one backend protocol (`backend.py`) that other
methods plug into; hyperparameters, second-moment statistics, context templates, compute_u /
compute_v, the rank-one update, apply and restore.

    from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, restore_weights
    hp = ROMEHyperParams.from_name("smollm2-135m")
    model, orig = apply_rome_to_model(mt.model, mt.tokenizer, [request], hp,
                                      return_orig_weights=True, corpus="wiki.txt",
                                      stats_dir="stats")
    restore_weights(model, orig)
"""
from .backend import (EditBackend, WeightDelta, apply_edits, backend_names, get_backend, register_backend,
                      restore_weights)
from .compute_u import compute_u, get_inv_cov
from .compute_v import ValueInfo, compute_v
from .covariance import StatisticsError
from .hparams import ROMEHyperParams, list_presets
from .requests import normalize_request
from .rome import apply_rome_to_model, execute_rome, rank_one_update, update_matrix
from .rome_checkpoint import apply_rome_resumable
from .sites import EditSite, edit_sites
from .stats import LayerStats, SecondMoment, layer_stats, load_stats_file, stats_path
from .fast import apply_rome_batch, execute_rome_fast
from .fast_compute_v import fast_compute_v
from .fast_stats import layer_stats_fast
from .templates import get_context_templates


def clear_caches() -> None:
    """Forget the process-wide caches (context templates, inverse second moments)."""
    # the modules' functions by name: `from . import compute_u` would give the function of that name
    from .compute_u import clear_cache as clear_inverses
    from .solve_update import clear_factor_cache
    from .templates import clear_cache as clear_templates
    clear_inverses()
    clear_factor_cache()
    clear_templates()


__all__ = ["EditBackend", "EditSite", "LayerStats", "ROMEHyperParams", "SecondMoment", "StatisticsError",
           "apply_rome_resumable",
           "ValueInfo", "WeightDelta", "apply_edits", "apply_rome_batch", "apply_rome_to_model", "backend_names",
           "clear_caches", "compute_u", "compute_v", "edit_sites", "execute_rome", "execute_rome_fast",
           "fast_compute_v", "get_backend", "get_context_templates", "get_inv_cov", "layer_stats",
           "layer_stats_fast", "list_presets", "load_stats_file", "normalize_request", "rank_one_update",
           "register_backend", "restore_weights", "stats_path", "update_matrix"]
