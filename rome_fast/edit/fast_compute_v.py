"""Fast value optimisation: the reference's compute_v, same rows, loss, Adam steps, clamp and
early stop, with exact savings only (docs/editing.md, "The fast backend"):

* δ enters at the MLP output of the edit layer L, so the blocks below L are constant: they run
  once, and every step starts from the cached input of block L.
* Causal attention and δ added at each row's lookup index: a row's positions before
  s_i = min(lookup_i, first loss position) never change across steps. One no-grad run of the
  upper blocks over the prefix [0, P) (P = max s_i) records their keys/values; each step runs
  blocks L..N-1 only on the rows' suffixes [s_i, ℓ_i), left-aligned and right-padded, with a 4-D
  mask over [cached prefix | suffix] keys (row i sees prefix columns < s_i, and its suffix
  causally). The KL row needs one position (its lookup index) so its suffix is one token wide.
* The head runs only where the loss reads it (the target positions and the KL row's position),
  not over the full vocabulary at every position."""
from __future__ import annotations

import torch

from ..models import adapter_for
from ..models.base import KVRecorder, KVReplay, mask_like
from .compute_u import key_indices, right_padded
from .compute_v import KL_PROMPT, _escape, optimise_delta, right_vector
from .requests import check_key_mode, target_token_ids


@torch.no_grad()
def prepare_suffix_run(a, emb, mask, lengths, h_in, start, end, first_layer: int):
    """The suffix batch of blocks first_layer..N-1, for inputs h_in (the hidden states entering
    block first_layer, full width) that change across steps only at or after each row's
    start_i: one no-grad run of those blocks over the prefix [0, P) (P = max start_i) records
    their keys/values; returns (h_suf, ctx): row i's positions start_i + j at column j (width
    S = max(end_i − start_i), right-padded), and a context whose 4-D mask lets row i see the
    prefix columns < start_i and its suffix causally, with the recorded prefix replayed."""
    device = h_in.device
    n_rows, N = h_in.shape[0], a.num_layers
    P, S = max(start), max(e - s for s, e in zip(start, end))
    rec = KVRecorder()  # the prefix run's keys/values
    if P > 0:
        hp, pctx = a.prepare(emb[:, :P], mask[:, :P], full_mask=True)
        pctx.past = rec
        hp = h_in[:, :P]
        for l in range(first_layer, N):
            hp = a.run_block(l, hp, pctx)
        rec.keys = {k: v.detach() for k, v in rec.keys.items()}
        rec.values = {k: v.detach() for k, v in rec.values.items()}
    cols = torch.arange(S, device=device)
    st = torch.tensor(start, device=device)
    pos = st[:, None] + cols[None, :]
    src = torch.minimum(pos, torch.tensor(lengths, device=device)[:, None] - 1)  # padding reads a real token
    h_suf = h_in.gather(1, src[:, :, None].expand(-1, -1, h_in.shape[2])).contiguous()
    _, sctx = a.prepare(emb[:, :S], torch.ones(n_rows, S, dtype=mask.dtype, device=device),
                        position_ids=src, full_mask=True)  # padding columns: any valid position
    pre_ok = torch.arange(P, device=device)[None, :] < st[:, None]           # (rows, P)
    suf_ok = cols[None, :] <= cols[:, None]                                  # (S, S) causal
    allowed = torch.cat([pre_ok[:, None, :].expand(-1, S, -1),
                         suf_ok[None].expand(n_rows, -1, -1)], dim=2)[:, None]
    sctx.attention_mask = mask_like(allowed, sctx.attention_mask)
    sctx.past = KVReplay(rec, width=P)
    return h_suf, sctx


def value_rows(tok, request: dict, context_templates, fact_token: str, device):
    """The reference's 22 rows: ids, mask, lengths, lookup indices, target ids."""
    target_ids = target_token_ids(tok, request["target_new"]["str"])
    forced = _escape(tok.decode(target_ids[:-1]))
    rewriting = [c.format(request["prompt"]) + forced for c in context_templates]
    all_prompts = rewriting + [KL_PROMPT]
    ids, mask = right_padded(tok, [p.format(request["subject"]) for p in all_prompts], device)
    lookup = key_indices(tok, all_prompts, request["subject"], fact_token)
    return ids, mask, mask.sum(1).tolist(), lookup, target_ids, len(rewriting)


def optimize_value(model, tok, request: dict, hparams, layer: int, context_templates, adapter=None):
    """Optimise δ as the reference does. Returns (v_init, delta, losses, steps, lookup)."""
    a = adapter or adapter_for(model)
    device = next(model.parameters()).device
    ids, mask, lengths, lookup, target_ids, n_rw = value_rows(tok, request, context_templates,
                                                              hparams.fact_token, device)
    n_t, n_rows, N = len(target_ids), ids.shape[0], a.num_layers
    if not 0 <= layer < N:
        raise ValueError(f"edit layer {layer} is outside the model's {N} layers")
    mlp = a.mlp(layer)  # δ enters at its output
    for i in range(n_rows):
        if not 0 <= lookup[i] < lengths[i]:
            raise ValueError(f"lookup index {lookup[i]} is outside row {i} of length {lengths[i]}")

    # suffix of row i: [start_i, end_i); rewriting rows need logits at ℓ−n_t … ℓ−1, the KL row at
    # its lookup index only
    start = [min(lookup[i], lengths[i] - n_t) for i in range(n_rw)] + [lookup[n_rw]]
    end = lengths[:n_rw] + [lookup[n_rw] + 1]

    # one no-grad run: blocks 0..L-1 over the full width (block L's input, constant)
    with torch.no_grad():
        emb = a.embed(ids)
        h, ctx = a.prepare(emb, mask, full_mask=True)
        for l in range(layer):
            h = a.run_block(l, h, ctx)
        h_in = h
    h_suf, sctx = prepare_suffix_run(a, emb, mask, lengths, h_in, start, end, layer)

    rows = torch.arange(n_rows, device=device)
    st = torch.tensor(start, device=device)
    width = torch.tensor([e - s for s, e in zip(start, end)], device=device)
    at = torch.tensor(lookup, device=device) - st                             # δ's column per row
    # loss positions: rewriting rows' targets (columns ℓ−n_t−s … ℓ−1−s), then the KL row's column
    t_rows = torch.arange(n_rw, device=device).repeat_interleave(n_t)
    t_cols = torch.cat([torch.arange(lengths[i] - n_t, lengths[i], device=device) - start[i]
                        for i in range(n_rw)])
    t_ids = torch.tensor(target_ids, device=device).repeat(n_rw)
    if not bool((width > 0).all()) or int(t_cols.min()) < 0:  # cannot happen with start <= loss positions
        raise RuntimeError("fast value optimisation: a row's suffix misses a loss position")

    hidden = h_in.shape[2]
    delta = torch.zeros(hidden, dtype=torch.float32, device=device, requires_grad=True)
    state = {"v_init": None}

    def add_delta(_module, _args, out):
        y = out[0] if isinstance(out, tuple) else out
        if state["v_init"] is None:
            state["v_init"] = y[0, at[0]].detach().float().clone()
        y = y.clone()
        y[rows, at] = y[rows, at] + delta.to(y.dtype)
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

    def forward():
        x = h_suf
        for l in range(layer, N):
            x = a.run_block(l, x, sctx)
        picked = torch.cat([x[t_rows, t_cols], x[n_rw:, 0]])  # KL row: its lookup column
        logp = torch.log_softmax(a.head(picked).float(), dim=-1)
        tok_logp = logp[:n_rw * n_t].gather(1, t_ids[:, None])[:, 0].view(n_rw, n_t)
        return (-tok_logp.sum(1) / n_t).mean(), logp[n_rw * n_t:]

    handle = mlp.register_forward_hook(add_delta)
    try:
        losses, steps = optimise_delta(model, hparams, delta, state, forward)
    finally:
        handle.remove()
    return state["v_init"], delta.detach(), losses, steps, lookup


def fast_compute_v(model, tok, request: dict, hparams, layer: int, left_vector: torch.Tensor,
                   context_templates, key_mode: str = "reference", k_bar: torch.Tensor | None = None,
                   return_info: bool = False, adapter=None):
    """Drop-in for `compute_v` (same arguments, same returns) on the fast value optimisation."""
    check_key_mode(key_mode)
    v_init, delta, losses, steps, lookup = optimize_value(model, tok, request, hparams, layer,
                                                          context_templates, adapter)
    return right_vector(model, tok, request, hparams, layer, left_vector, context_templates, key_mode,
                        k_bar, v_init, delta, losses, steps, lookup, return_info)
