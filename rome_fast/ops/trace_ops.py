"""Causal tracing's row-wise ops (csrc/cpu/trace_ops.cpp, csrc/cuda/trace_kernels.cu): the compiled
op where it can run on the tensors' device, the plain-PyTorch reference beside each."""
from __future__ import annotations

import torch

from .. import _ext


def add_noise_ref(x: torch.Tensor, noise: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                  lengths: torch.Tensor, replace: bool = False) -> torch.Tensor:
    """x[rows[n], starts[n] + l] (+)= noise[n, l] for l < lengths[n], in place; returns x."""
    for n in range(noise.shape[0]):
        r, s, ln = int(rows[n]), int(starts[n]), int(lengths[n])
        if ln == 0:
            continue
        piece = noise[n, :ln].to(torch.float32)
        if replace:
            x[r, s:s + ln] = piece.to(x.dtype)
        else:
            x[r, s:s + ln] = (x[r, s:s + ln].float() + piece).to(x.dtype)
    return x


def restore_rows_ref(x: torch.Tensor, clean: torch.Tensor, row_fact: torch.Tensor,
                     row_tok: torch.Tensor) -> torch.Tensor:
    """x[b, row_tok[b]] = clean[row_fact[b], row_tok[b]] where row_tok[b] >= 0, in place."""
    if clean.dim() == 2:
        clean = clean.unsqueeze(0)
    keep = row_tok >= 0
    b = torch.nonzero(keep).flatten()
    if b.numel():
        t = row_tok[b]
        x[b, t] = clean[row_fact[b], t]
    return x


def _as_index(v, n: int, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.long).contiguous()
    if isinstance(v, int):
        return torch.full((n,), v, dtype=torch.long, device=device)
    return torch.as_tensor(v, dtype=torch.long, device=device).contiguous()


def add_noise_(x: torch.Tensor, noise: torch.Tensor, rows, starts, lengths=None,
               replace: bool = False) -> torch.Tensor:
    """Add (or with `replace`, write) `noise` [N, L, D] at token positions starts[n]… of rows[n]."""
    if noise.dim() == 2:
        noise = noise.unsqueeze(0)
    n, length = noise.shape[0], noise.shape[1]
    rows = _as_index(rows, n, x.device)
    starts = _as_index(starts, n, x.device)
    lengths = _as_index(length if lengths is None else lengths, n, x.device)
    noise = noise.to(device=x.device, dtype=torch.float32).contiguous()
    if _ext.native_for(x) and x.is_contiguous():
        torch.ops.rome_fast.add_noise_(x, noise, rows, starts, lengths, replace)
        return x
    return add_noise_ref(x, noise, rows, starts, lengths, replace)


def restore_rows_(x: torch.Tensor, clean: torch.Tensor, row_fact, row_tok) -> torch.Tensor:
    """Overwrite, in one launch, the restore position of every row of `x` [B, T, D] with the clean
    state of its fact: clean is [T, D] or [F, T, D]; row_tok[b] = -1 leaves row b alone."""
    if clean.dim() == 2:
        clean = clean.unsqueeze(0)
    b = x.shape[0]
    row_fact = _as_index(row_fact, b, x.device)
    row_tok = _as_index(row_tok, b, x.device)
    if _ext.native_for(x) and x.is_contiguous() and clean.is_contiguous():
        torch.ops.rome_fast.restore_rows_(x, clean, row_fact, row_tok)
        return x
    return restore_rows_ref(x, clean, row_fact, row_tok)


@_ext.register_fake("add_noise_")
def _add_noise_fake(x, noise, rows, starts, lengths, replace=False):
    return None


@_ext.register_fake("restore_rows_")
def _restore_rows_fake(x, clean, row_fact, row_tok):
    return None
