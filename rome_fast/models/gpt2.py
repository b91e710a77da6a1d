"""GPT-2 family (gpt2 … gpt2-xl): Conv1D weights stored (in, out), learned position embeddings."""
from __future__ import annotations

from .base import BlockContext, ModelAdapter


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layer_template = "transformer.h.{}"
    mlp_template = "transformer.h.{}.mlp"
    attn_template = "transformer.h.{}.attn"
    rewrite_template = "transformer.h.{}.mlp.c_proj"
    embed_name = "transformer.wte"
    final_norm_name = "transformer.ln_f"
    lm_head_name = "lm_head"
    weight_layout = "in_out"

    def _block_input(self, inputs_embeds, ctx: BlockContext):
        tr = self.model.transformer
        return tr.drop(inputs_embeds + tr.wpe(ctx.position_ids))
