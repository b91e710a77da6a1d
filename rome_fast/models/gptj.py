"""GPT-J: parallel attention + MLP, rotary positions computed inside attention from position_ids."""
from __future__ import annotations

from .base import ModelAdapter


class GPTJAdapter(ModelAdapter):
    family = "gptj"
    model_types = ("gptj",)
    layer_template = "transformer.h.{}"
    mlp_template = "transformer.h.{}.mlp"
    attn_template = "transformer.h.{}.attn"
    rewrite_template = "transformer.h.{}.mlp.fc_out"
    embed_name = "transformer.wte"
    final_norm_name = "transformer.ln_f"
    lm_head_name = "lm_head"

    def _block_input(self, inputs_embeds, ctx):
        return self.model.transformer.drop(inputs_embeds)

    cache_kwarg = "layer_past"

    def block_kwargs(self, ctx):
        return dict(attention_mask=ctx.attention_mask, position_ids=ctx.position_ids)
