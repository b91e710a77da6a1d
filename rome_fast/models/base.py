"""The adapter interface: where a model family keeps its parts, and how to run it block by block.

One small adapter per family (as TransformerLens / pyvene do) instead of `if arch == ...` through
the code. Names follow the reference's dotted-module style (`transformer.h.{}` for GPT-2/J).

transformers renames arguments between releases (the blocks' key/value cache: `layer_past`,
`past_key_values`, `cache`; the mask builder's `input_embeds` / `inputs_embeds`), so the names are
read from the installed version's signatures, never passed under a deprecated name."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class BlockContext:
    """What every block of one batch needs besides the hidden states (masks, rotary tables)."""
    attention_mask: Any
    position_ids: torch.Tensor
    extra: dict = field(default_factory=dict)
    past: Any = None  # a key/value cache object handed to every block's attention

    def suffix(self, start: int) -> "BlockContext":
        """The context of the query positions [start, T) of every row, for a run whose keys and
        values before `start` come from a cache (needs a materialised 4-D mask)."""
        if start == 0:
            return self
        if not isinstance(self.attention_mask, torch.Tensor) or self.attention_mask.dim() != 4:
            raise ValueError("suffix runs need a materialised 4-D attention mask")

        def cut(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                return v[:, start:].contiguous()  # read by every block: one copy, not one per use
            if isinstance(v, (tuple, list)):
                return type(v)(cut(x) for x in v)
            return v

        return BlockContext(self.attention_mask[:, :, start:, :], self.position_ids[:, start:],
                            {k: cut(v) for k, v in self.extra.items()}, self.past)

    def select(self, index: torch.Tensor | slice) -> "BlockContext":
        """The context of a subset of the batch's rows (index or slice along the batch)."""
        batch = self.position_ids.shape[0]

        def pick(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
                return v[index]
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch == 1:
                n = len(range(*index.indices(1))) if isinstance(index, slice) else len(index)
                return v.expand(n, *v.shape[1:]) if n != 1 else v
            if isinstance(v, (tuple, list)):
                return type(v)(pick(x) for x in v)
            return v  # None, or a tensor broadcast over the batch

        return BlockContext(pick(self.attention_mask), pick(self.position_ids),
                            {k: pick(v) for k, v in self.extra.items()}, self.past)


class KVRecorder:
    """Stands in for a transformers KV cache handed to every block of a run (`BlockContext.past`):
    keeps each layer's keys and values (after rotary) and hands them back unchanged, so a later
    run can prepend them instead of recomputing the positions they cover."""

    def __init__(self):
        self.keys: dict = {}
        self.values: dict = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class KVReplay:
    """Stands in for a KV cache in a run over later positions: prepends to each layer's new keys
    and values the ones a `KVRecorder` kept for the positions before (the same by causality).

    rows: which recorded row each row of the run continues (None: row i continues row i), so many
    runs can branch off one recorded run; width: how many recorded positions to prepend (None:
    all). The attention mask must cover [prepended | new] keys."""

    def __init__(self, recorded: KVRecorder, rows: torch.Tensor | None = None, width: int | None = None):
        self.recorded, self.rows, self.width = recorded, rows, width

    def _past(self, store: dict, layer_idx: int, n: int) -> torch.Tensor:
        past = store[layer_idx]
        if self.rows is not None:
            return past[self.rows[:n], :, :self.width]
        return past if self.width is None else past[:, :, :self.width]

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.width == 0:
            return key, value
        n = key.shape[0]
        return (torch.cat([self._past(self.recorded.keys, layer_idx, n), key], dim=-2),
                torch.cat([self._past(self.recorded.values, layer_idx, n), value], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.width is not None:
            return self.width
        return self.recorded.keys[layer_idx].shape[-2] if layer_idx in self.recorded.keys else 0


def mask_like(allowed: torch.Tensor, like) -> torch.Tensor:
    """A boolean (rows, 1, q, kv) mask of allowed attention, in the format of the attention
    implementation's own materialised mask `like`: boolean (sdpa) or additive float (eager)."""
    if isinstance(like, torch.Tensor) and like.dtype != torch.bool:
        out = torch.zeros(allowed.shape, dtype=like.dtype, device=allowed.device)
        return out.masked_fill_(~allowed, torch.finfo(like.dtype).min)
    if like is not None and not isinstance(like, torch.Tensor):
        raise ValueError(f"a custom attention mask needs a tensor mask to imitate, got {type(like).__name__}")
    return allowed


class ModelAdapter:
    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    layer_template: ClassVar[str] = ""     # one transformer block
    mlp_template: ClassVar[str] = ""       # the block's MLP (its output is restored by kind="mlp")
    attn_template: ClassVar[str] = ""      # the block's attention (kind="attn")
    rewrite_template: ClassVar[str] = ""   # MLP output projection: input = key k, output = value v
    embed_name: ClassVar[str] = ""         # token (word) embeddings
    final_norm_name: ClassVar[str] = ""
    lm_head_name: ClassVar[str] = ""
    weight_layout: ClassVar[str] = "out_in"  # nn.Linear stores (out, in); GPT-2 Conv1D (in, out)
    # older spellings of this family's module names (from earlier transformers releases, as in the
    # reference's hyperparameter files) -> today's
    legacy_names: ClassVar[dict] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.embedding.weight.shape[1]

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (its configuration's n_positions /
        max_position_embeddings); None when the configuration does not say."""
        for name in ("n_positions", "max_position_embeddings"):
            n = getattr(self.config, name, None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
        return None

    @property
    def key_size(self) -> int:
        """Width of the MLP key (the rewrite module's input)."""
        return self.linear_io(self.rewrite_name(0))[0]

    @property
    def value_size(self) -> int:
        """Width of the rewrite module's output: the MLP output added to the residual stream."""
        return self.linear_io(self.rewrite_name(0))[1]

    def linear_io(self, name: str) -> tuple[int, int]:
        """(input width, output width) of a linear layer inside a block, read from its weight in
        the family's `weight_layout`."""
        try:
            w = getattr(self.model.get_submodule(name), "weight", None)
        except AttributeError:
            raise ValueError(f"the {self.family} model has no module {name!r}") from None
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"module {name!r} is not a linear layer (no 2-D weight)")
        return (w.shape[0], w.shape[1]) if self.weight_layout == "in_out" else (w.shape[1], w.shape[0])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layer_template.rsplit(".", 1)[0])

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_submodule(self.embed_name)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def layer_name(self, layer: int) -> str:
        return self.layer_template.format(layer)

    def mlp_name(self, layer: int) -> str:
        return self.mlp_template.format(layer)

    def attn_name(self, layer: int) -> str:
        return self.attn_template.format(layer)

    def rewrite_name(self, layer: int) -> str:
        return self.rewrite_template.format(layer)

    def rewrite_weight_name(self, layer: int) -> str:
        """The parameter an edit of `layer` changes (stored in `weight_layout`)."""
        return self.rewrite_name(layer) + ".weight"

    def module_name(self, kind: str | None, layer: int) -> str:
        """The reference's `layername(model, num, kind)`: block, 'mlp', 'attn' or 'embed'."""
        if kind == "embed":
            return self.embed_name
        if kind in (None, "hidden", "block"):
            return self.layer_name(layer)
        if kind == "mlp":
            return self.mlp_name(layer)
        if kind == "attn":
            return self.attn_name(layer)
        raise ValueError(f"unknown module kind {kind!r}: expected None/'hidden', 'mlp', 'attn' or 'embed'")

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def mlp(self, layer: int) -> nn.Module:
        return self.module(self.mlp_name(layer))

    def attn(self, layer: int) -> nn.Module:
        return self.module(self.attn_name(layer))

    def rewrite_module(self, layer: int) -> nn.Module:
        return self.module(self.rewrite_name(layer))

    def rewrite_weight(self, layer: int) -> torch.Tensor:
        return self.rewrite_module(layer).weight

    def final_norm(self) -> nn.Module:
        return self.module(self.final_norm_name)

    def lm_head(self) -> nn.Module:
        return self.module(self.lm_head_name)

    # ---- running block by block -------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings only (the module whose output causal tracing corrupts)."""
        return self.embedding(input_ids)

    def prepare(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                full_mask: bool = False) -> tuple[torch.Tensor, BlockContext]:
        """From word embeddings to block 0's input, and the per-batch context of every block.
        `full_mask` always materialises the 4-D mask (in the attention implementation's format)
        instead of letting an unpadded batch rely on `is_causal`."""
        b, t = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(t, device=inputs_embeds.device).unsqueeze(0).expand(b, t)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=inputs_embeds.device)
        mask = _causal_mask(self.config, inputs_embeds, attention_mask, position_ids, full_mask)
        ctx = BlockContext(mask, position_ids)
        return self._block_input(inputs_embeds, ctx), ctx

    def _block_input(self, inputs_embeds: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return inputs_embeds

    @functools.cached_property
    def cache_kwarg(self) -> str:
        """The name under which this transformers version's blocks take a key/value cache."""
        return cache_argument(self.blocks[0])

    def block_kwargs(self, ctx: BlockContext) -> dict:
        """Keyword arguments of one block call besides the hidden states."""
        return dict(attention_mask=ctx.attention_mask)

    def run_block(self, layer: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        kwargs = self.block_kwargs(ctx)
        if ctx.past is not None:
            kwargs[self.cache_kwarg] = ctx.past
        return first_tensor(self.blocks[layer](hidden, **kwargs))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding: logits for the given positions."""
        return self.lm_head()(self.final_norm()(hidden))

    def forward_blockwise(self, input_ids: torch.Tensor, attention_mask=None,
                          position_ids=None) -> torch.Tensor:
        """Logits from running every block through the adapter (checks the adapter is right)."""
        h, ctx = self.prepare(self.embed(input_ids), attention_mask, position_ids)
        for layer in range(self.num_layers):
            h = self.run_block(layer, h, ctx)
        return self.head(h)


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> dict:
    return dict(inspect.signature(fn).parameters)


# a block's key/value cache argument, newest name first
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_argument(module: nn.Module) -> str:
    """The name under which the installed transformers' `module.forward` (a block, or a whole
    model) takes a key/value cache."""
    params = _parameters(type(module).forward)
    for name in _CACHE_NAMES:
        if name in params:
            return name
    raise ValueError(f"{type(module).__name__}.forward takes no key/value cache "
                     f"(none of {', '.join(_CACHE_NAMES)}): this transformers version is not supported")


def returned_cache(output):
    """The key/value cache a model's forward returned (`cache`; `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _causal_mask(config, inputs_embeds, attention_mask, position_ids, full_mask: bool):
    """transformers' own causal mask for the attention implementation in use. With `full_mask` the
    mask is materialised even where transformers would pass None and rely on `is_causal`."""
    from transformers.masking_utils import create_causal_mask

    params = _parameters(create_causal_mask)
    kwargs = dict(config=config, attention_mask=attention_mask, position_ids=position_ids)
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params and params["cache_position"].default is inspect.Parameter.empty:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    if "allow_is_causal_skip" in params:
        kwargs["allow_is_causal_skip"] = not full_mask
    mask = create_causal_mask(**kwargs)
    if mask is None and full_mask:  # older versions skip an unpadded batch's mask: build it
        t = inputs_embeds.shape[1]
        q = torch.arange(t, device=inputs_embeds.device)
        allowed = (q[None, :] <= q[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        eager = getattr(config, "_attn_implementation", None) == "eager"
        mask = mask_like(allowed, torch.zeros((), dtype=inputs_embeds.dtype) if eager else None)
    return mask


def first_tensor(output):
    """A module's hidden output: blocks return a tensor or a tuple whose first item is it."""
    return output[0] if isinstance(output, (tuple, list)) else output
