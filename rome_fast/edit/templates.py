"""Context templates (docs/editing.md, "Context templates"): short texts sampled from the model,
each followed by ". {}", plus the bare "{}". The reference samples them once per process with no
seed; here the sampling is seeded (a torch.Generator, so the global RNG is untouched), cached per
(model, length params, seed) in this module, and the list can be passed to the edit explicitly."""
from __future__ import annotations

import unicodedata

import torch

from ..models.base import cache_argument, returned_cache

_CACHE: dict = {}


def start_token_id(tok) -> int:
    """The single token generation starts from: the reference's "<|endoftext|>" is GPT-2's BOS
    (= EOS); a tokenizer without a BOS starts from its EOS."""
    for token, tid in ((tok.bos_token, tok.bos_token_id), (tok.eos_token, tok.eos_token_id)):
        if token is not None and tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")


@torch.no_grad()
def sample_top_k(model, start_id: int, n: int, max_out_len: int, top_k: int = 5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """n sequences of max_out_len tokens (the start token included), sampling each next token
    from the renormalised top-k of the next-token distribution, with a KV cache and the full
    attention mask (the reference passed only the last mask column; docs/editing.md).
    Like the reference, sampling goes on past an EOS to the full length."""
    device = next(model.parameters()).device
    ids = torch.full((n, 1), start_id, dtype=torch.long, device=device)
    past = None
    cur = ids
    while ids.shape[1] < max_out_len:
        mask = torch.ones_like(ids)
        out = model(input_ids=cur, attention_mask=mask, use_cache=True, **{cache_argument(model): past})
        past = returned_cache(out)
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
        top_p, top_i = torch.topk(probs, top_k, dim=-1)
        pick = torch.multinomial((top_p / top_p.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
        cur = top_i.gather(1, pick.to(device))
        ids = torch.cat([ids, cur], dim=1)
    return ids


def _clean(text: str, tok) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    for special in (tok.eos_token, tok.bos_token):
        if special:
            text = text.replace(special, "")
    # a brace would break str.format when the subject is filled in (the reference's bug)
    return text.replace("{", " ").replace("}", " ")


def generate_context_templates(model, tok, length_params=((5, 10), (10, 10)), seed: int = 0,
                               top_k: int = 5) -> list[str]:
    """["{}"] + [sample + ". {}" ...]: for each [length, count], `count` samples of `length`
    tokens counting the start token (so length-1 new tokens), as the reference's generate_fast."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    start = start_token_id(tok)
    texts = []
    try:
        for length, count in length_params:
            if int(length) < 1 or int(count) < 0:
                raise ValueError(f"bad context_template_length_params entry {[length, count]}")
            ids = sample_top_k(model, start, int(count), int(length), top_k, gen)
            texts += [tok.decode(row.tolist(), skip_special_tokens=True) for row in ids.cpu()]
    finally:
        model.train(was_training)
    return ["{}"] + [_clean(t, tok) + ". {}" for t in texts]


def get_context_templates(model, tok, length_params=((5, 10), (10, 10)), seed: int = 0,
                          cache: bool = True) -> list[str]:
    """The context templates for `model`, generated once per (model, length params, seed) and
    cached for the process (as the reference caches them after the first edit: later edits of
    the same model reuse the templates sampled from the model before any edit)."""
    params = tuple((int(a), int(b)) for a, b in length_params)
    key = (id(model), getattr(model.config, "_name_or_path", ""), params, int(seed))
    if cache and key in _CACHE:
        return list(_CACHE[key])
    templates = generate_context_templates(model, tok, params, seed)
    if cache:
        _CACHE[key] = templates
    return list(templates)


def clear_cache() -> None:
    _CACHE.clear()


def template_room(length_params) -> int:
    """Tokens a context template adds before a prompt at most: the longest sample and ". "."""
    return max((int(length) for length, _ in length_params), default=0) + 2
