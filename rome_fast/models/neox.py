"""GPT-NeoX / Pythia: `gpt_neox.layers`, parallel residual, untied `embed_out` head."""
from __future__ import annotations

from .rotary import RotaryModelAdapter


class GPTNeoXAdapter(RotaryModelAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    layer_template = "gpt_neox.layers.{}"
    mlp_template = "gpt_neox.layers.{}.mlp"
    attn_template = "gpt_neox.layers.{}.attention"
    rewrite_template = "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    embed_name = "gpt_neox.embed_in"
    final_norm_name = "gpt_neox.final_layer_norm"
    lm_head_name = "lm_head"  # `embed_out` before transformers 5
    legacy_names = {"embed_out": "lm_head"}
    rotary_name = "gpt_neox.rotary_emb"

    def _block_input(self, inputs_embeds, ctx):
        return super()._block_input(self.model.gpt_neox.emb_dropout(inputs_embeds), ctx)

    def lm_head(self):
        return getattr(self.model, "lm_head", None) or self.model.embed_out
