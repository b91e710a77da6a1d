"""rome_fast's ops: each compiled op (torch.ops.rome_fast.*, csrc/) beside its plain-PyTorch
reference `<op>_ref` (the test oracle, and the fallback where the compiled core cannot run) and its
fake (shapes for torch.compile). Contracts, numerics and how to add an op: docs/kernels.md.

  trace_ops   add_noise_, restore_rows_        causal tracing's row-wise noise and restore
  update_ops  rank_k_update_, rome_update_     the weight update of an edit
              (pieces: cholesky_solve, normalize_dot)
  block_ops   rope_heads                       the fused transformer block's rotary embedding
"""
from .block_ops import rope_heads, rope_heads_ref
from .trace_ops import add_noise_, add_noise_ref, restore_rows_, restore_rows_ref
from .update_ops import (LAYOUTS, MIN_COSINE, normalize_dot_ref, rank_k_update_, rank_k_update_ref,
                         rome_update_, rome_update_ref)

__all__ = ["LAYOUTS", "MIN_COSINE", "add_noise_", "add_noise_ref", "normalize_dot_ref",
           "rank_k_update_", "rank_k_update_ref", "restore_rows_", "restore_rows_ref", "rome_update_",
           "rome_update_ref", "rope_heads", "rope_heads_ref"]
