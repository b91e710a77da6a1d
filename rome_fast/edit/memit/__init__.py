"""MEMIT: many facts edited at once across several MLP layers (docs/memit.md), with the reference's
names; the fast backend is the default, the reference backend is the test oracle.

    from rome_fast.edit.memit import MEMITHyperParams, apply_memit_to_model
    hp = MEMITHyperParams.from_name("smollm2-135m")
    model, orig = apply_memit_to_model(mt.model, mt.tokenizer, requests, hp,
                                       return_orig_weights=True, corpus="wiki.txt")
"""
from .compute_ks import compute_ks, get_module_input_output_at_words
from .compute_z import ZInfo, compute_z
from .fast import MEMITFast
from .fast_z import compute_zs
from .hparams import MEMITHyperParams, list_presets
from .main import MEMITReference, apply_memit_to_model, check_memit_requests, execute_memit
from .solve import SingularSystemError, solve, solve_reference
from .stats import get_cov, layer_factors
from .templates import get_context_templates


def clear_caches() -> None:
    """Forget the process-wide caches: context templates, second moments, C's factors."""
    from . import stats as _s, templates as _t
    from ..solve_update import clear_factor_cache
    _s.clear_cache()
    _t.clear_cache()
    clear_factor_cache()


__all__ = ["MEMITFast", "MEMITHyperParams", "MEMITReference", "SingularSystemError", "ZInfo",
           "apply_memit_to_model", "check_memit_requests", "clear_caches", "compute_ks", "compute_z",
           "compute_zs", "execute_memit", "get_context_templates", "get_cov",
           "get_module_input_output_at_words", "layer_factors", "list_presets", "solve", "solve_reference"]
