"""GPT-J: parallel attention + MLP, rotary positions (computed once for all blocks in recent
transformers, inside each attention from the position ids in older ones)."""
from __future__ import annotations

from .rotary import RotaryModelAdapter


class GPTJAdapter(RotaryModelAdapter):
    family = "gptj"
    model_types = ("gptj",)
    layer_template = "transformer.h.{}"
    mlp_template = "transformer.h.{}.mlp"
    attn_template = "transformer.h.{}.attn"
    rewrite_template = "transformer.h.{}.mlp.fc_out"
    embed_name = "transformer.wte"
    final_norm_name = "transformer.ln_f"
    lm_head_name = "lm_head"
    rotary_name = "transformer.rotary_emb"

    def _block_input(self, inputs_embeds, ctx):
        return super()._block_input(self.model.transformer.drop(inputs_embeds), ctx)
