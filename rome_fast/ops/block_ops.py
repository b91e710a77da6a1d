"""The fused transformer block's rotary embedding (csrc/cpu/block_ops.cpp,
csrc/cuda/block_kernels.cu) beside its plain-PyTorch reference."""
from __future__ import annotations

import torch

from .. import _ext


def rope_heads_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H·hd] -> [B, H, T, hd] with the rotary embedding applied as transformers applies it
    (x·cos + rotate_half(x)·sin; cos/sin [B or 1, T, hd])."""
    b, t, width = x.shape
    x = x.view(b, t, heads, width // heads).transpose(1, 2)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """One pass instead of the seven elementwise ops (and their temporaries) of the plain form."""
    if (_ext.native_for(x) and x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
            and cos.dtype == x.dtype == sin.dtype):
        return torch.ops.rome_fast.rope_heads(x, cos, sin, heads)
    return rope_heads_ref(x, cos, sin, heads)


@_ext.register_fake("rope_heads")
def _rope_heads_fake(x, cos, sin, heads):
    b, t, width = x.shape
    return x.new_empty((b, heads, t, width // heads))
