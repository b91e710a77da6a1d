"""The reference's `rome` package: `from rome import ROMEHyperParams, apply_rome_to_model` becomes
`from rome_fast.compat.rome import ROMEHyperParams, apply_rome_to_model`. `compute_u`,
`compute_v` and `layer_stats` are, as in the reference, modules of the package (each holding the
function of its name), so `rome.layer_stats.layer_stats` and `from rome.compute_u import …` work."""
from .compute_u import get_inv_cov
from .compute_v import find_fact_lookup_idx, get_module_input_output_at_word
from .rome_hparams import ROMEHyperParams
from .rome_main import apply_rome_to_model, execute_rome, get_context_templates, upd_matrix_match_shape

__all__ = ["ROMEHyperParams", "apply_rome_to_model", "execute_rome", "find_fact_lookup_idx",
           "get_context_templates", "get_inv_cov", "get_module_input_output_at_word", "upd_matrix_match_shape"]
