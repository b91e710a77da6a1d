"""rome_fast: fast causal tracing and ROME editing of factual associations in transformer LMs.

    import rome_fast as rf
    mt = rf.load_model()                      # the embedded SmolLM2-135M, fp32
    rf.backend_info()                         # what is compiled and usable here
"""
from ._ext import backend_info
from .ops import add_noise_, restore_rows_
from .models import (ModelAdapter, ModelAndTokenizer, UnsupportedArchitectureError, adapter_for,
                     load_model)
from .tokens import (decode_tokens, find_token_range, get_words_idxs_in_templates, make_inputs,
                     subject_key_index)
from .eval import evaluate, load_counterfact, load_zsre, summarize
from .edit import ROMEHyperParams, apply_rome_to_model, execute_rome, layer_stats, restore_weights
from .trace import (TraceResult, calculate_hidden_flow, collect_embedding_std, layername,
                    plot_hidden_flow, plot_trace_heatmap, predict_from_input, predict_token,
                    trace_important_states, trace_important_window, trace_with_patch)

__version__ = "0.1.0"

__all__ = ["ModelAdapter", "ModelAndTokenizer", "UnsupportedArchitectureError", "add_noise_",
           "adapter_for", "backend_info", "decode_tokens", "find_token_range",
           "get_words_idxs_in_templates", "load_model", "make_inputs", "restore_rows_",
           "subject_key_index",
           # causal tracing (the reference's names)
           "TraceResult", "calculate_hidden_flow", "collect_embedding_std", "layername",
           "plot_hidden_flow", "plot_trace_heatmap", "predict_from_input", "predict_token",
           "trace_important_states", "trace_important_window", "trace_with_patch",
           # ROME editing, reference path
           "ROMEHyperParams", "apply_rome_to_model", "execute_rome", "layer_stats", "restore_weights",
           # evaluation of edits
           "evaluate", "load_counterfact", "load_zsre", "summarize"]
