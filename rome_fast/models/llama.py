"""Llama family (Llama, Mistral, Qwen2, SmolLM2): gated MLP whose key is the input of `down_proj`.

Mistral / Qwen2 sliding-window attention is the same as full attention for prompts shorter than
the window (4k+ tokens), which covers every prompt traced or edited here.

Without autograd, a block runs fused (`_fused_block`): the same modules and the same arithmetic
as transformers' decoder layer, less its temporaries: rotary embedding and head split in one
compiled pass, the SiLU gate and the residual adds in place, one RMSNorm call. On a CPU, where
these elementwise steps are memory-bound and every fresh large tensor costs page faults, that is
a quarter of a block's time. Forward hooks on the attention and MLP modules still run (the
engine's restores, recorders); a block with hooks the fused path cannot honour runs unfused."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module_state

from ..ops import rope_heads
from .base import first_tensor
from .rotary import RotaryModelAdapter


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _run_forward_hooks(module, args: tuple, output):
    """What `module(*args)` would do with `output` after forward: its forward hooks, in order."""
    for hook_id, hook in module._forward_hooks.items():
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, {}, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    # half types: normalise in fp32, round, then scale, as the model's RMSNorm does
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype)


class LlamaAdapter(RotaryModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    layer_template = "model.layers.{}"
    mlp_template = "model.layers.{}.mlp"
    attn_template = "model.layers.{}.self_attn"
    rewrite_template = "model.layers.{}.mlp.down_proj"
    embed_name = "model.embed_tokens"
    final_norm_name = "model.norm"
    lm_head_name = "lm_head"
    rotary_name = "model.rotary_emb"

    def run_block(self, layer, hidden, ctx):
        block = self.blocks[layer]
        if torch.is_grad_enabled() or not self._fusable(block, ctx):
            return super().run_block(layer, hidden, ctx)
        return self._fused_block(block, layer, hidden, ctx)

    def _fusable(self, block, ctx) -> bool:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        return (attn is not None and mlp is not None and all(hasattr(attn, p) for p in parts)
                and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
                and hasattr(block.input_layernorm, "variance_epsilon")
                and getattr(self.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
                and not _has_hooks(block) and not attn._forward_pre_hooks and not mlp._forward_pre_hooks
                and not _module_state._global_forward_hooks and not _module_state._global_forward_pre_hooks
                and "position_embeddings" in ctx.extra
                and (ctx.attention_mask is None or isinstance(ctx.attention_mask, torch.Tensor)))

    def _fused_block(self, block, layer, h, ctx):
        attn, mlp = block.self_attn, block.mlp
        B, T, _ = h.shape
        hd = attn.head_dim
        cos, sin = ctx.extra["position_embeddings"]

        x = _rms_norm(h, block.input_layernorm)
        n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        q = rope_heads(attn.q_proj(x), cos, sin, n_q)
        k = rope_heads(attn.k_proj(x), cos, sin, n_kv)
        v = attn.v_proj(x).view(B, T, n_kv, hd).transpose(1, 2)
        if ctx.past is not None:
            k, v = ctx.past.update(k, v, layer)
        mask = ctx.attention_mask
        if mask is None and k.shape[2] != T:
            raise ValueError("a run with cached keys needs a materialised attention mask")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           is_causal=mask is None and T > 1, enable_gqa=n_q != n_kv)
        o = attn.o_proj(o.transpose(1, 2).reshape(B, T, n_q * hd))
        o = first_tensor(_run_forward_hooks(attn, (x,), (o, None)))
        # in place only on tensors no hook has seen (a hook may have kept a reference)
        h = o.add_(h) if not (_has_hooks(attn) or _has_hooks(attn.o_proj)) else h + o

        x = _rms_norm(h, block.post_attention_layernorm)
        g = mlp.gate_proj(x)
        if _has_hooks(mlp.gate_proj):
            g = g.clone()
        if self.config.hidden_act in ("silu", "swish"):
            g = F.silu(g, inplace=True)
        else:
            g = mlp.act_fn(g)
        m = mlp.down_proj(g.mul_(mlp.up_proj(x)))
        m = _run_forward_hooks(mlp, (x,), m)
        return m.add_(h) if not (_has_hooks(mlp) or _has_hooks(mlp.down_proj)) else h + m
