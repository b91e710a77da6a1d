"""GPT-J: parallel attention + MLP, rotary positions (computed inside attention from position_ids
up to transformers 5.2x; from the model-level `transformer.rotary_emb` tables after)."""
from __future__ import annotations

import inspect

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
        h = self.model.transformer.drop(inputs_embeds)
        if hasattr(self.model.transformer, "rotary_emb"):
            return super()._block_input(h, ctx)
        return h

    @property
    def cache_kwarg(self) -> str:
        params = inspect.signature(self.blocks[0].forward).parameters
        return "cache" if "cache" in params else "layer_past"

    def block_kwargs(self, ctx):
        kw = dict(attention_mask=ctx.attention_mask, position_ids=ctx.position_ids)
        if "position_embeddings" in ctx.extra:
            kw["position_embeddings"] = ctx.extra["position_embeddings"]
        return kw
