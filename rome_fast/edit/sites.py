"""Where an edit reads and writes, from the model's adapter (the one source of family facts).

Hyperparameter files in the reference's format name modules (`rewrite_module_tmp`,
`mlp_module_tmp`, `layer_module_tmp`, `attn_module_tmp`, `ln_f_module`, `lm_head_module`). Here
they are optional: left out (None), the adapter's are used; given, each must name the adapter's
own module (or a spelling of it from an older transformers release, or, for the head, the token
embedding, which the reference's GPT-2 files name as GPT-2 ties the two), so a preset file loads
unchanged and a typo or a module from another family is a clear error instead of an edit of the
wrong weight. Only the rewrite and MLP modules are used by editing; the others are checked so
that a file written for another model is not taken for this one's."""
from __future__ import annotations

from dataclasses import dataclass

from ..models import adapter_for

# hparams field -> (what it names, the adapter's name for layer l, or for a model-wide module)
_PER_LAYER = {"rewrite_module_tmp": ("rewrite module (the MLP's output projection)", "rewrite_name"),
              "mlp_module_tmp": ("MLP", "mlp_name"),
              "layer_module_tmp": ("transformer block", "layer_name"),
              "attn_module_tmp": ("attention module", "attn_name")}
_MODEL_WIDE = {"ln_f_module": ("final norm", "final_norm_name"),
               "lm_head_module": ("unembedding (LM head)", "lm_head_name")}


@dataclass(frozen=True)
class EditSite:
    """One edited layer: the rewrite module (input = key k, output = value), its weight and the
    weight's layout, and the MLP whose output the value optimisation shifts."""
    layer: int
    rewrite: str       # module name, e.g. "model.layers.5.mlp.down_proj"
    weight: str        # parameter name: rewrite + ".weight"
    mlp: str           # module name, e.g. "model.layers.5.mlp"
    layout: str        # "in_out" (W is [d_k, d_v], GPT-2 Conv1D) or "out_in" (nn.Linear)
    key_size: int      # d_k, the rewrite module's input width
    value_size: int    # d_v, its output width


def _same_module(model, adapter, given: str, expected: str, getter) -> bool:
    if given == expected or adapter.legacy_names.get(given) == expected:
        return True
    try:
        mod = model.get_submodule(given)
    except AttributeError:
        return False
    try:
        want = getter()
    except AttributeError:
        return False
    if mod is want:
        return True
    w, w_want = getattr(mod, "weight", None), getattr(want, "weight", None)
    return w is not None and w is w_want  # tied, e.g. GPT-2's wte and lm_head


def check_module_names(model, hparams, layers=None) -> None:
    """Raise a ValueError naming the field when an hparams module name is not the adapter's."""
    a = adapter_for(model)
    layers = sorted(set(hparams.layers if layers is None else layers))
    for field, (what, method) in _PER_LAYER.items():
        tmp = getattr(hparams, field, None)
        if tmp is None:
            continue
        for layer in layers:
            given, expected = tmp.format(layer), getattr(a, method)(layer)
            if not _same_module(model, a, given, expected, lambda: a.module(expected)):
                _mismatch(model, a, field, given, expected, what)
    for field, (what, attr) in _MODEL_WIDE.items():
        given = getattr(hparams, field, None)
        if given is None:
            continue
        expected = getattr(a, attr)
        getter = a.lm_head if field == "lm_head_module" else a.final_norm
        # the reference's GPT-2 files name the token embedding as the head (GPT-2 ties the two)
        also = a.embed_name if field == "lm_head_module" else None
        if given != also and not _same_module(model, a, given, expected, getter):
            _mismatch(model, a, field, given, expected, what)


def _mismatch(model, a, field, given, expected, what):
    try:
        model.get_submodule(given)
        problem = f"is not the {a.family} model's {what}"
    except AttributeError:
        problem = "is not a module of this model"
    raise ValueError(f"hparams.{field} names {given!r}, which {problem}; its adapter says {expected!r}. "
                     f"Leave the field out (or null) to use the adapter's, or fix it")


def edit_sites(model, hparams, layers=None) -> list[EditSite]:
    """The edited layers of `hparams` (or `layers`), in ascending order, after checking the
    hparams' module names against the adapter and the layers against the model."""
    a = adapter_for(model)
    layers = sorted(set(hparams.layers if layers is None else layers))
    bad = [l for l in layers if not 0 <= l < a.num_layers]
    if bad:
        raise ValueError(f"edit layer(s) {bad} out of range for a {a.num_layers}-layer model")
    check_module_names(model, hparams, layers)
    out = []
    for layer in layers:
        d_k, d_v = a.linear_io(a.rewrite_name(layer))
        out.append(EditSite(layer, a.rewrite_name(layer), a.rewrite_weight_name(layer), a.mlp_name(layer),
                            a.weight_layout, d_k, d_v))
    return out
