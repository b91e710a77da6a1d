"""Every public name of the reference modules that rome_fast.compat stands in for, with the
reference's signature recorded as data: parameter names, order, kinds and defaults. Ours must
start with exactly those parameters; anything we add comes after them and has a default (so every
call written for the reference means the same here). Instance methods are recorded without self,
classes by their constructor."""
from __future__ import annotations

import importlib
import inspect

import pytest

ANY = object()  # a default that exists but is not compared (the reference's is a module object)

# module -> name -> the reference's parameters: "name", "name=default" (default as a Python literal),
# "*args", "**kwargs"; ANY as a default for "a default of any value".
REFERENCE = {
    "experiments.causal_trace": {
        "trace_with_patch": ["model", "inp", "states_to_patch", "answers_t", "tokens_to_mix", "noise=0.1",
                             "uniform_noise=False", "replace=False", "trace_layers=None"],
        "trace_with_repatch": ["model", "inp", "states_to_patch", "states_to_unpatch", "answers_t",
                               "tokens_to_mix", "noise=0.1", "uniform_noise=False"],
        "calculate_hidden_flow": ["mt", "prompt", "subject", "samples=10", "noise=0.1", "token_range=None",
                                  "uniform_noise=False", "replace=False", "window=10", "kind=None", "expect=None"],
        "trace_important_states": ["model", "num_layers", "inp", "e_range", "answer_t", "noise=0.1",
                                   "uniform_noise=False", "replace=False", "token_range=None"],
        "trace_important_window": ["model", "num_layers", "inp", "e_range", "answer_t", "kind", "window=10",
                                   "noise=0.1", "uniform_noise=False", "replace=False", "token_range=None"],
        "ModelAndTokenizer": ["model_name=None", "model=None", "tokenizer=None", "low_cpu_mem_usage=False",
                              "torch_dtype=None"],
        "layername": ["model", "num", "kind=None"],
        "guess_subject": ["prompt"],
        "plot_hidden_flow": ["mt", "prompt", "subject=None", "samples=10", "noise=0.1", "uniform_noise=False",
                             "window=10", "kind=None", "savepdf=None"],
        "plot_trace_heatmap": ["result", "savepdf=None", "title=None", "xlabel=None", "modelname=None"],
        "plot_all_flow": ["mt", "prompt", "subject=None"],
        "make_inputs": ["tokenizer", "prompts", "device='cuda'"],
        "decode_tokens": ["tokenizer", "token_array"],
        "find_token_range": ["tokenizer", "token_array", "substring"],
        "predict_token": ["mt", "prompts", "return_p=False"],
        "predict_from_input": ["model", "inp"],
        "collect_embedding_std": ["mt", "subjects"],
        "get_embedding_cov": ["mt"],
        "make_generator_transform": ["mean=None", "cov=None"],
        "collect_embedding_gaussian": ["mt"],
        "collect_embedding_tdist": ["mt", "degree=3"],
        "main": [],
    },
    "rome": {
        "apply_rome_to_model": ["model", "tok", "requests", "hparams", "copy=False", "return_orig_weights=False"],
        "execute_rome": ["model", "tok", "request", "hparams"],
        "upd_matrix_match_shape": ["matrix", "shape"],
        "get_context_templates": ["model", "tok", "length_params"],
        "get_inv_cov": ["model", "tok", "layer_name", "mom2_dataset", "mom2_n_samples", "mom2_dtype"],
        "get_module_input_output_at_word": ["model", "tok", "layer", "context_template", "word",
                                            "module_template", "fact_token_strategy"],
        "find_fact_lookup_idx": ["prompt", "subject", "tok", "fact_token_strategy", "verbose=True"],
        "ROMEHyperParams.from_json": ["fpath"],
    },
    "rome.compute_u": {
        "compute_u": ["model", "tok", "request", "hparams", "layer", "context_templates"],
        "get_inv_cov": None},
    "rome.compute_v": {
        "compute_v": ["model", "tok", "request", "hparams", "layer", "left_vector", "context_templates"],
        "get_module_input_output_at_word": None, "find_fact_lookup_idx": None},
    "rome.layer_stats": {
        "layer_stats": ["model", "tokenizer", "layer_name", "stats_dir", "ds_name", "to_collect",
                        "model_name=None", "sample_size=None", "precision=None", "batch_tokens=None",
                        "download=True", ("progress", ANY)],
    },
    "rome.rome_main": {"apply_rome_to_model": None, "execute_rome": None, "upd_matrix_match_shape": None,
                       "get_context_templates": None},
    "rome.rome_hparams": {"ROMEHyperParams.from_json": ["fpath"]},
    "util.nethook": {
        "Trace": ["module", "layer=None", "retain_output=True", "retain_input=False", "clone=False",
                  "detach=False", "retain_grad=False", "edit_output=None", "stop=False"],
        "TraceDict": ["module", "layers=None", "retain_output=True", "retain_input=False", "clone=False",
                      "detach=False", "retain_grad=False", "edit_output=None", "stop=False"],
        "StopForward": None,
        "recursive_copy": ["x", "clone=None", "detach=None", "retain_grad=None"],
        "subsequence": ["sequential", "first_layer=None", "last_layer=None", "after_layer=None",
                        "upto_layer=None", "single_layer=None", "share_weights=False"],
        "hierarchical_subsequence": ["sequential", "first", "last", "after", "upto", "share_weights=False",
                                     "depth=0"],
        "set_requires_grad": ["requires_grad", "*models"],
        "get_module": ["model", "name"],
        "get_parameter": ["model", "name"],
        "replace_module": ["model", "name", "new_module"],
        "invoke_with_optional_args": ["fn", "*args", "**kwargs"],
    },
    "util.generate": {
        "generate_fast": ["model", "tok", "prompts", "n_gen_per_prompt=1", "top_k=5", "max_out_len=200",
                          "reseed=None"],
        "generate_interactive": ["model", "tok", "top_k=5", "max_out_len=200", "compare_against=None",
                                 "use_logit_lens=False", "layer_module_tmp='transformer.h.{}'",
                                 "ln_f_module='transformer.ln_f'", "lm_head_module='transformer.wte'"],
    },
    "util.logit_lens": {
        "LogitLens": ["model", "tok", "layer_module_tmp", "ln_f_module", "lm_head_module", "disabled=False"],
    },
    "util.globals": {"DATA_DIR": None, "STATS_DIR": None, "HPARAMS_DIR": None, "RESULTS_DIR": None,
                     "REMOTE_ROOT_URL": None},
    "dsets": {
        "KnownsDataset": ["data_dir", "*args", "**kwargs"],
        "CounterFactDataset": ["data_dir", "size=None", "*args", "**kwargs"],
        "MENDQADataset": ["data_dir", "tok", "*args", "**kwargs"],
        "AttributeSnippets": ["data_dir"],
    },
    "experiments.py.demo": {
        "demo_model_editing": ["model", "tok", "requests", "generation_prompts", "alg_name='ROME'"],
        "load_alg": ["alg_name"],
        "print_loud": ["x", "pad=3"],
        "stop_execution": [],
    },
}

NO_DEFAULT = inspect.Parameter.empty


def _parse(entry):
    """(name, kind, default) of one recorded parameter."""
    if isinstance(entry, tuple):
        return entry[0], inspect.Parameter.POSITIONAL_OR_KEYWORD, entry[1]
    if entry.startswith("**"):
        return entry[2:], inspect.Parameter.VAR_KEYWORD, NO_DEFAULT
    if entry.startswith("*"):
        return entry[1:], inspect.Parameter.VAR_POSITIONAL, NO_DEFAULT
    name, eq, default = entry.partition("=")
    return name, inspect.Parameter.POSITIONAL_OR_KEYWORD, eval(default) if eq else NO_DEFAULT  # noqa: S307 (literals we wrote)


def _resolve(module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _cases():
    for mod, names in REFERENCE.items():
        for name, params in names.items():
            yield pytest.param(mod, name, params, id=f"{mod}.{name}")


@pytest.mark.parametrize("mod,name,params", list(_cases()))
def test_reference_signature(mod, name, params):
    module = importlib.import_module(f"rome_fast.compat.{mod}")
    assert hasattr(module, name.split(".")[0]), f"rome_fast.compat.{mod} lacks {name}"
    if params is None:  # recorded in another module, or a constant / exception class: must exist
        recorded = next((p for m, n in REFERENCE.items() for k, p in n.items() if k == name and p is not None), None)
        if recorded is None:
            return
        params = recorded
    obj = _resolve(module, name)
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    ours = [p for p in sig.parameters.values() if not (inspect.isclass(obj) and p.name == "self")]
    for i, entry in enumerate(params):
        ref_name, ref_kind, ref_default = _parse(entry)
        assert i < len(ours), f"{name}: missing parameter {ref_name!r}"
        p = ours[i]
        assert p.name == ref_name, f"{name}: parameter {i} is {p.name!r}, the reference's is {ref_name!r}"
        if ref_kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            assert p.kind == ref_kind, f"{name}: {ref_name} should be {ref_kind}"
            continue
        assert p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{name}: {ref_name} must be positional"
        if ref_default is NO_DEFAULT:
            assert p.default is NO_DEFAULT, f"{name}: {ref_name} has a default; the reference's does not"
        elif ref_default is not ANY:
            assert p.default == ref_default and type(p.default) is type(ref_default), \
                f"{name}: {ref_name} defaults to {p.default!r}, the reference's to {ref_default!r}"
        else:
            assert p.default is not NO_DEFAULT
    for p in ours[len(params):]:  # ours only: optional, so reference calls are unaffected
        assert p.default is not NO_DEFAULT or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD), \
            f"{name}: the extra parameter {p.name!r} has no default"
