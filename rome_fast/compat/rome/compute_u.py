"""The reference's `rome.compute_u`: `compute_u` (the key / left vector) and `get_inv_cov`, with
statistics from `util.globals.STATS_DIR` (see `layer_stats` for the corpus)."""
from __future__ import annotations

from ...edit.compute_u import compute_u as _compute_u
from ...edit.compute_u import get_inv_cov as _get_inv_cov
from ...edit.corpus import local_corpus
from ...edit.stats import corpus_ds_name
from ..util import globals as _globals
from .layer_stats import env_corpus, explain_offline


def get_inv_cov(model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype):
    """C⁻¹ of `layer_name`'s keys in float32, cached for the process."""
    corpus = local_corpus(env_corpus(), mom2_dataset)
    return _get_inv_cov(model, tok, layer_name, _globals.STATS_DIR, corpus_ds_name(corpus, mom2_dataset),
                        mom2_n_samples, mom2_dtype, corpus=corpus)


def compute_u(model, tok, request, hparams, layer, context_templates):
    """u = C⁻¹ k̄ / ‖C⁻¹ k̄‖, k̄ the key at the subject averaged over the context templates."""
    with explain_offline(model, hparams, [layer]) as corpus:
        return _compute_u(model, tok, request, hparams, layer, context_templates,
                          stats_dir=_globals.STATS_DIR, corpus=corpus)


__all__ = ["compute_u", "get_inv_cov"]
