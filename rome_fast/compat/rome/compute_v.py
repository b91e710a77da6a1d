"""The reference's `rome.compute_v`: `compute_v` (the value / right vector),
`get_module_input_output_at_word` and `find_fact_lookup_idx`."""
from __future__ import annotations

from ...edit.compute_u import key_indices, module_io_at
from ...edit.compute_v import compute_v  # the reference's parameters first, then rome_fast's options
from ...models import adapter_for


def get_module_input_output_at_word(model, tok, layer, context_template, word, module_template,
                                    fact_token_strategy):
    """(input, output) of module `module_template.format(layer)` at the fact token of
    `context_template` filled with `word` (1-D, detached). A module_template the model does not
    have (None, or another family's name) means the model's rewrite module."""
    name = module_template.format(layer) if module_template else None
    adapter = adapter_for(model)
    if name is None or name not in dict(model.named_modules()):
        name = adapter.rewrite_name(layer)
    ins, outs = module_io_at(model, tok, name, [context_template], word, fact_token_strategy)
    return ins[0], outs[0]


def find_fact_lookup_idx(prompt, subject, tok, fact_token_strategy, verbose=True):
    """The token index whose key is read for `prompt` (with "{}" for the subject): -1 for "last",
    else the subject token the strategy names."""
    if fact_token_strategy == "last":
        idx = -1
    else:
        idx = key_indices(tok, [prompt], subject, fact_token_strategy)[0]
    if verbose:
        text = prompt.format(subject)
        ids = tok(text)["input_ids"]
        print(f"Lookup index found: {idx} | Sentence: {text} | Token: {tok.decode(ids[idx])}")
    return idx


__all__ = ["compute_v", "find_fact_lookup_idx", "get_module_input_output_at_word"]
