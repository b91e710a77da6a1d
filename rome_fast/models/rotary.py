"""Shared by the families whose model computes the rotary (cos, sin) tables once for all blocks."""
from __future__ import annotations

from .base import BlockContext, ModelAdapter


class RotaryModelAdapter(ModelAdapter):
    rotary_name = ""  # the model-level rotary embedding module (absent: each attention computes it)

    def _block_input(self, inputs_embeds, ctx: BlockContext):
        try:
            rotary = self.module(self.rotary_name)
        except AttributeError:
            return inputs_embeds
        ctx.extra["position_embeddings"] = rotary(inputs_embeds, position_ids=ctx.position_ids)
        return inputs_embeds

    def block_kwargs(self, ctx):
        kwargs = dict(attention_mask=ctx.attention_mask, position_ids=ctx.position_ids)
        if "position_embeddings" in ctx.extra:
            kwargs["position_embeddings"] = ctx.extra["position_embeddings"]
        return kwargs
