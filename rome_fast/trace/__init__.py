"""Causal tracing (Meng et al. 2022; docs/tracing.md).

- `api.calculate_hidden_flow`: one fact, one kind, on a registered backend ("reference", "fast").
- `kinds`: the registry of what a cell restores (hidden states, MLP and attention outputs).
- `engine.TraceEngine`: the fast engine (many cells of many facts per forward pass).
- `reference`: the reference's one-forward-per-cell functions (the test oracle).
- `noise`: σ of the embeddings, the reference's per-call noise, noise rules ("s3", "u0.5", ...).
- `results.TraceResult`: save/load in the reference's `.npz` layout.
- `runner.trace_facts`: resumable runs over a known-facts file; `aggregate`: AIE/ATE figures.
"""
from .aggregate import aggregate_dir, aggregate_results, bucket_rows
from .api import BACKENDS, DEFAULT_BACKEND, TraceBackend, calculate_hidden_flow, register_backend
from .kinds import KINDS, TraceKind, get_kind, register_kind
from .noise import collect_embedding_std, draw_noise, resolve_noise
from .plots import plot_hidden_flow, plot_trace_heatmap
from .reference import (layername, predict_from_input, predict_token, trace_important_states,
                        trace_important_window, trace_with_patch)
from .results import TraceResult
from .runner import load_facts, trace_facts, trace_one_fact

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "KINDS", "TraceBackend", "TraceKind", "TraceResult", "get_kind",
           "register_backend", "register_kind", "aggregate_dir", "aggregate_results", "bucket_rows",
           "calculate_hidden_flow", "collect_embedding_std", "draw_noise", "layername", "load_facts",
           "plot_hidden_flow", "plot_trace_heatmap", "predict_from_input", "predict_token",
           "resolve_noise", "trace_facts", "trace_important_states", "trace_important_window",
           "trace_one_fact", "trace_with_patch"]
