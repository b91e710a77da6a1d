"""The reference's `experiments/causal_trace.py` names, backed by rome_fast.

    from rome_fast.compat.causal_trace import ModelAndTokenizer, calculate_hidden_flow, ...

`calculate_hidden_flow` and `plot_hidden_flow` also take `backend="fast"`. Beyond the reference,
every family rome_fast supports works (GPT-2, GPT-J, NeoX, Llama/Mistral/Qwen2)."""
from __future__ import annotations

import torch

from ..models import ModelAndTokenizer
from ..tokens import decode_tokens, find_token_range
from ..tokens import make_inputs as _make_inputs
from ..trace.api import calculate_hidden_flow
from ..trace.noise import collect_embedding_std
from ..trace.plots import guess_subject, plot_all_flow, plot_hidden_flow, plot_trace_heatmap
from ..trace.reference import (layername, predict_from_input, predict_token, trace_important_states,
                               trace_important_window, trace_with_patch)


def make_inputs(tokenizer, prompts, device=None) -> dict:
    """Left-padded batch; the device defaults to CUDA when available (the reference's is "cuda")."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _make_inputs(tokenizer, prompts, device=device)


__all__ = ["ModelAndTokenizer", "make_inputs", "decode_tokens", "find_token_range", "predict_token",
           "predict_from_input", "trace_with_patch", "trace_important_states", "trace_important_window",
           "calculate_hidden_flow", "collect_embedding_std", "plot_trace_heatmap", "plot_hidden_flow",
           "plot_all_flow", "guess_subject", "layername"]
