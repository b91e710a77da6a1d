"""Llama family (Llama, Mistral, Qwen2, SmolLM2): gated MLP whose key is the input of `down_proj`.

Mistral / Qwen2 sliding-window attention is the same as full attention for prompts shorter than
the window (4k+ tokens), which covers every prompt traced or edited here."""
from __future__ import annotations

from .rotary import RotaryModelAdapter


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
