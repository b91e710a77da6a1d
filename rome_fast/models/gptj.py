"""GPT-J: parallel attention + MLP, rotary positions computed inside attention from position_ids."""
from __future__ import annotations

from .base import ModelAdapter, first_tensor


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

    def run_block(self, layer, hidden, ctx):
        return first_tensor(self.blocks[layer](hidden, attention_mask=ctx.attention_mask,
                                               position_ids=ctx.position_ids))
