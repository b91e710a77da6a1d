"""The value / right vector (docs/editing.md, "Value optimisation"): optimise δ added to the edit
layer's MLP output at the subject's key token so the model predicts the new target after every
context template, then turn v* = v_init + δ into the right vector (v* − y*) / ⟨k*, u⟩."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .compute_u import key_indices, module_io_at, right_padded
from ..hooks import TraceDict
from .requests import check_key_mode, target_token_ids
from .sites import edit_sites

KL_PROMPT = "{} is a"
STOP_LOSS = 5e-2  # the value optimisation stops once loss < STOP_LOSS


@dataclass
class ValueInfo:
    """The pieces of one value optimisation (for tests of the fast path and for debugging)."""
    k_star: torch.Tensor          # rewrite-module input at the subject token of the bare prompt
    y_star: torch.Tensor          # its output there (bias included)
    v_init: torch.Tensor          # MLP output of row 0 at its subject token, before any δ
    delta: torch.Tensor           # the optimised δ (after the norm clamp)
    v_star: torch.Tensor          # v_init + δ
    right: torch.Tensor           # (v* − y*) / ⟨k, u⟩
    denom: float                  # ⟨k, u⟩ with the key used (k* or, in r-ROME mode, k̄)
    losses: list = field(default_factory=list)  # (nll, kl, wd) per evaluated step
    steps: int = 0                # Adam steps taken
    lookup_idxs: list = field(default_factory=list)
    u: torch.Tensor | None = None      # the left vector (filled in by execute_rome)
    k_bar: torch.Tensor | None = None  # the template-averaged key u was built from


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def delta_adder(module_name: str, rows, at, delta: torch.Tensor, state: dict):
    """The `edit_output` of a TraceDict that adds δ to `module_name`'s output at (rows, at) and
    keeps row 0's output before δ (at the first call) as state["v_init"]."""
    def add_delta(out, name):
        if name != module_name:
            return out
        if state["v_init"] is None:
            state["v_init"] = out[rows[0], at[0]].detach().float().clone()
        out = out.clone()  # transformers 5 blocks return the bare hidden tensor (no tuple)
        out[rows, at] = out[rows, at] + delta.to(out.dtype)
        return out
    return add_delta


def optimise_delta(model, hparams, delta: torch.Tensor, state: dict, forward) -> tuple[list, int]:
    """The reference's optimisation of δ (docs/editing.md), shared by both paths: Adam(v_lr);
    loss = nll + kl_factor·KL(p‖p₀) + v_weight_decay·‖δ‖/‖v_init‖²; stop when loss < 5e-2; the
    last iteration only evaluates; δ clamped to clamp_norm_factor·‖v_init‖ after each step.
    `forward()` runs the model with δ applied (its first call sets state["v_init"]) and returns
    (nll, KL-row log-probabilities). Returns the (nll, kl, wd) of each iteration and the steps."""
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    was_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init, losses, steps = None, [], 0
    try:
        for it in range(hparams.v_num_grad_steps):
            opt.zero_grad()
            with torch.enable_grad():
                nll, kl_logp = forward()
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = hparams.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            wd = hparams.v_weight_decay * (delta.norm() / state["v_init"].norm() ** 2)
            loss = nll + kl + wd
            losses.append((nll.item(), kl.item(), wd.item()))
            if loss.item() < STOP_LOSS:
                break
            if it == hparams.v_num_grad_steps - 1:
                break  # the last iteration only evaluates (at most v_num_grad_steps-1 steps)
            loss.backward()
            opt.step()
            steps += 1
            max_norm = hparams.clamp_norm_factor * state["v_init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta.mul_(max_norm / delta.norm())
    finally:
        for p, g in zip(model.parameters(), was_grad):
            p.requires_grad_(g)
    return losses, steps


def compute_v(model, tok, request: dict, hparams, layer: int, left_vector: torch.Tensor,
              context_templates, key_mode: str = "reference", k_bar: torch.Tensor | None = None,
              return_info: bool = False):
    """The right vector of the rank-one update (and a `ValueInfo` with return_info=True).

    key_mode "reference": k*, y* from the bare prompt (the reference). "r-rome": k̄ and ȳ, the
    key and rewrite-module output averaged over the context templates (the keys u was built
    from), so the update maps k̄ (not k*) to v*; pass `k_bar` to skip recomputing it."""
    check_key_mode(key_mode)
    device = next(model.parameters()).device
    (site,) = edit_sites(model, hparams, [layer])
    mlp_name = site.mlp
    target_ids = target_token_ids(tok, request["target_new"]["str"])
    n_t = len(target_ids)

    # rewriting prompts teacher-force the target's first n-1 tokens; one KL prompt
    forced = _escape(tok.decode(target_ids[:-1]))
    rewriting = [c.format(request["prompt"]) + forced for c in context_templates]
    all_prompts = rewriting + [KL_PROMPT]
    ids, mask = right_padded(tok, [p.format(request["subject"]) for p in all_prompts], device)
    n_rw = len(rewriting)

    targets = torch.full((n_rw, ids.shape[1]), -100, dtype=torch.long, device=device)
    lengths = mask.sum(1).tolist()
    for i in range(n_rw):
        targets[i, lengths[i] - n_t:lengths[i]] = torch.tensor(target_ids, device=device)
    lookup = key_indices(tok, all_prompts, request["subject"], hparams.fact_token)
    rows = torch.arange(len(all_prompts), device=device)
    at = torch.tensor(lookup, device=device)

    delta = torch.zeros(site.value_size, dtype=torch.float32, device=device, requires_grad=True)
    state = {"v_init": None}

    add_delta = delta_adder(mlp_name, rows, at, delta, state)

    # hparams.v_loss_layer is not read: as at the reference's HEAD, the loss uses the final logits
    tmask = (targets != -100).float()

    def forward():
        with TraceDict(model, [mlp_name], retain_output=False, edit_output=add_delta):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        kl_logp = torch.log_softmax(logits[n_rw + torch.arange(len(all_prompts) - n_rw, device=device),
                                           at[n_rw:]], dim=-1)
        logp = torch.log_softmax(logits[:n_rw], dim=-1)
        tok_logp = logp.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
        return (-(tok_logp * tmask).sum(1) / n_t).mean(), kl_logp

    losses, steps = optimise_delta(model, hparams, delta, state, forward)

    return right_vector(model, tok, request, hparams, layer, left_vector, context_templates, key_mode,
                        k_bar, state["v_init"], delta.detach(), losses, steps, lookup, return_info)


def right_vector(model, tok, request: dict, hparams, layer: int, left_vector, context_templates,
                 key_mode: str, k_bar, v_init, delta, losses, steps, lookup, return_info: bool):
    """(v* − y)/⟨k, u⟩ from the optimised δ (both value paths): k*, y* of the bare prompt, or with
    r-ROME the template means k̄, ȳ. Returns the right vector, with a ValueInfo if asked."""
    v_star = v_init + delta
    (site,) = edit_sites(model, hparams, [layer])
    rewrite = site.rewrite
    if key_mode == "reference":
        k, y = module_io_at(model, tok, rewrite, [request["prompt"]], request["subject"], hparams.fact_token)
        k, y = k[0], y[0]
    else:
        templates = [c.format(request["prompt"]) for c in context_templates]
        ks, ys = module_io_at(model, tok, rewrite, templates, request["subject"], hparams.fact_token)
        k, y = (ks.mean(0) if k_bar is None else k_bar), ys.mean(0)  # the module is affine: ȳ = W k̄ + b
    k, y = k.float(), y.float()
    denom = torch.dot(k, left_vector.to(k.device).float())
    right = (v_star - y) / denom
    if not return_info:
        return right
    return right, ValueInfo(k, y, v_init, delta, v_star, right, denom.item(), losses, steps, lookup)

