"""AlphaEdit: MEMIT's batch edits projected into the null space of the preserved keys, for
sequential editing that does not collapse (docs/alphaedit.md). The fast backend is the default,
the reference backend is the test oracle.

    from rome_fast.edit.alphaedit import AlphaEditHyperParams, apply_alphaedit_to_model
    hp = AlphaEditHyperParams.from_name("smollm2-135m")
    cache_c = {}
    for batch in batches:   # each call sees the keys of every batch before it
        model, _, cache_c = apply_alphaedit_to_model(mt.model, mt.tokenizer, batch, hp, cache_c=cache_c,
                                                     corpus="wiki.txt")
"""
from .fast import AlphaEditFast
from .hparams import AlphaEditHyperParams, list_presets
from .main import AlphaEditReference, apply_alphaedit_to_model, check_alphaedit_requests, execute_alphaedit
from .projection import (NullSpace, StatisticsError, get_project, layer_null_spaces, null_space,
                         projection_reference)


def clear_caches() -> None:
    """Forget the process-wide caches: MEMIT's (templates, moments, factors) and the projections."""
    from . import projection as _p
    from ..memit import clear_caches as _memit
    _memit()
    _p.clear_cache()


__all__ = ["AlphaEditFast", "AlphaEditHyperParams", "AlphaEditReference", "NullSpace", "StatisticsError",
           "apply_alphaedit_to_model", "check_alphaedit_requests", "clear_caches", "execute_alphaedit",
           "get_project", "layer_null_spaces", "list_presets", "null_space", "projection_reference"]
