"""Shared by the families whose model computes the rotary (cos, sin) tables once for all blocks."""
from __future__ import annotations

from .base import BlockContext, ModelAdapter, first_tensor


class RotaryModelAdapter(ModelAdapter):
    rotary_name = ""  # the model-level rotary embedding module

    def _block_input(self, inputs_embeds, ctx: BlockContext):
        rotary = self.module(self.rotary_name)
        ctx.extra["position_embeddings"] = rotary(inputs_embeds, position_ids=ctx.position_ids)
        return inputs_embeds

    def run_block(self, layer, hidden, ctx):
        return first_tensor(self.blocks[layer](
            hidden, attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
            position_embeddings=ctx.extra["position_embeddings"]))
