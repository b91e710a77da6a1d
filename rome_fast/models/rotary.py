"""Shared by the families whose model computes the rotary (cos, sin) tables once for all blocks."""
from __future__ import annotations

from .base import BlockContext, ModelAdapter


class RotaryModelAdapter(ModelAdapter):
    rotary_name = ""  # the model-level rotary embedding module

    def _block_input(self, inputs_embeds, ctx: BlockContext):
        rotary = self.module(self.rotary_name)
        ctx.extra["position_embeddings"] = rotary(inputs_embeds, position_ids=ctx.position_ids)
        return inputs_embeds

    def block_kwargs(self, ctx):
        return dict(attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
                    position_embeddings=ctx.extra["position_embeddings"])
