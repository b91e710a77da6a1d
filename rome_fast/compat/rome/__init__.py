"""The reference's `rome` package: `from rome import ROMEHyperParams, apply_rome_to_model` becomes
`from rome_fast.compat.rome import ROMEHyperParams, apply_rome_to_model`."""
from .compute_u import compute_u, get_inv_cov
from .compute_v import compute_v, find_fact_lookup_idx, get_module_input_output_at_word
from .layer_stats import layer_stats
from .rome_hparams import ROMEHyperParams
from .rome_main import apply_rome_to_model, execute_rome, get_context_templates, upd_matrix_match_shape

__all__ = ["ROMEHyperParams", "apply_rome_to_model", "compute_u", "compute_v", "execute_rome",
           "find_fact_lookup_idx", "get_context_templates", "get_inv_cov", "get_module_input_output_at_word",
           "layer_stats", "upd_matrix_match_shape"]
