"""Keys of a batch of requests at one layer, and the residual stream at the z layer.

The key of a request is the rewrite module's input at the subject's last token, averaged over the
context templates within each group, then over the groups (with ["{}"] and five prefixed
templates: the bare prompt weighs 1/2, each prefixed one 1/10). Attention is causal, so a key
depends only on the text up to the subject, not on the relation that follows."""
from __future__ import annotations

import torch

from ...models import adapter_for
from ..compute_u import module_io_at
from .templates import flat


def get_module_input_output_at_words(model, tok, layer: int, context_templates, words,
                                     module_template: str, fact_token_strategy: str,
                                     stop: bool = False):
    """(inputs, outputs) of module_template.format(layer) at each word's key token, one row per
    (template, word) pair. stop=True ends each forward after the module (the fast path; the
    reference runs the whole model)."""
    return module_io_at(model, tok, module_template.format(layer), list(context_templates), list(words),
                        fact_token_strategy, stop=stop)


def compute_ks(model, tok, requests, hparams, layer: int, context_templates, stop: bool = False) -> torch.Tensor:
    """K as [n, d_k]: one template-averaged key per request."""
    templates = flat(context_templates)
    sentences = [c.format(r["prompt"]) for r in requests for c in templates]
    words = [r["subject"] for r in requests for _ in templates]
    ks = get_module_input_output_at_words(model, tok, layer, sentences, words, adapter_for(model).rewrite_template,
                                          hparams.fact_token, stop=stop)[0]
    ks = ks.view(len(requests), len(templates), -1)
    bounds = [0]
    for group in context_templates:
        bounds.append(bounds[-1] + len(group))
    means = [ks[:, a:b].mean(1) for a, b in zip(bounds, bounds[1:])]
    return torch.stack(means, 0).mean(0)


def residual_at_z_layer(model, tok, requests, hparams, stop: bool = False) -> torch.Tensor:
    """The z layer's block output for the bare prompts at the subject's last token: [n, d]."""
    return get_module_input_output_at_words(model, tok, hparams.z_layer, [r["prompt"] for r in requests],
                                            [r["subject"] for r in requests], adapter_for(model).layer_template,
                                            hparams.fact_token, stop=stop)[1]
