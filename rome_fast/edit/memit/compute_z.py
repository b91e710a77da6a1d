"""The target vector z of one request (reference path): the residual stream after the z layer (the
last edited layer) at the subject's last token, pushed until the model predicts the new target
after every context template.

Rows: each context template filled with the request's prompt plus the target's tokens but the
last (teacher forcing), and the KL row "{subject} is a"; right-padded. δ ∈ ℝ^d (zero, fp32, Adam)
is added to the output of block `layer` at every row's lookup index (the subject's last token).
loss = NLL of the target tokens (the loss layer's output through the final norm and the
unembedding, as the reference) + kl_factor·KL(p‖p₀) of the KL row's next-token distribution at
its lookup index (final logits) + v_weight_decay·‖δ‖/‖h_init‖², with h_init the block output of
row 0 (the bare prompt) before any δ. Stop when loss < 0.05; the last iteration only evaluates;
after each step δ is clamped to clamp_norm_factor·‖h_init‖. z = h_init + δ."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...models import adapter_for
from ..compute_v import delta_adder, optimise_delta
from ...hooks import TraceDict
from .templates import flat


@dataclass
class ZInfo:
    """One request's target optimisation (for tests and debugging)."""
    z: torch.Tensor               # h_init + δ
    h_init: torch.Tensor          # block output of the bare prompt at the subject's last token
    delta: torch.Tensor
    losses: list = field(default_factory=list)  # (nll, kl, wd) per evaluated iteration
    steps: int = 0                # Adam steps taken
    lookup_idxs: list = field(default_factory=list)


def loss_layer(hparams, layer: int, num_layers: int) -> int:
    """The reference's max(v_loss_layer, z layer); a negative v_loss_layer counts from the end."""
    v = hparams.v_loss_layer
    return max(v if v >= 0 else num_layers + v, layer)


def z_rows(tok, request: dict, context_templates, fact_token: str, device):
    """The value rows of a request: ids, mask, lengths, lookup indices, target ids and the number
    of rewriting rows (every template, flattened), the KL row last."""
    from ..fast_compute_v import value_rows
    return value_rows(tok, request, flat(context_templates), fact_token, device)


def compute_z(model, tok, request: dict, hparams, layer: int, context_templates,
              return_info: bool = False):
    """z for `request` (normalised: target with a leading space) at block `layer`'s output."""
    device = next(model.parameters()).device
    adapter = adapter_for(model)
    ids, mask, lengths, lookup, target_ids, n_rw = z_rows(tok, request, context_templates,
                                                          hparams.fact_token, device)
    n_t = len(target_ids)
    targets = torch.full((n_rw, ids.shape[1]), -100, dtype=torch.long, device=device)
    for i in range(n_rw):
        targets[i, lengths[i] - n_t:lengths[i]] = torch.tensor(target_ids, device=device)
    rows = torch.arange(ids.shape[0], device=device)
    at = torch.tensor(lookup, device=device)

    layer_name = adapter.layer_name(layer)
    loss_name = adapter.layer_name(loss_layer(hparams, layer, adapter.num_layers))
    ln_f, head = adapter.final_norm(), adapter.lm_head()
    lm_w = head.weight.T
    lm_b = getattr(head, "bias", None)
    if lm_b is None:
        lm_b = lm_w.new_zeros(lm_w.shape[1])

    delta = torch.zeros(adapter.hidden_size, dtype=torch.float32, device=device, requires_grad=True)
    state = {"v_init": None}

    add_delta = delta_adder(layer_name, rows, at, delta, state)

    tmask = (targets != -100).float()

    def forward():
        names = list(dict.fromkeys([loss_name, layer_name]))  # the same block once (δ added once)
        with TraceDict(model, names, retain_output=True, edit_output=add_delta, detach=False) as tr:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kl_logp = torch.log_softmax(logits[n_rw:, :][torch.arange(ids.shape[0] - n_rw, device=device),
                                                    at[n_rw:]].float(), dim=-1)
        full = tr[loss_name].output[:n_rw]
        logp = torch.log_softmax((ln_f(full) @ lm_w + lm_b).float(), dim=2)
        tok_logp = logp.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
        return (-(tok_logp * tmask).sum(1) / n_t).mean(), kl_logp

    losses, steps = optimise_delta(model, hparams, delta, state, forward)
    h_init = state["v_init"]
    z = h_init + delta.detach()
    if not return_info:
        return z
    return z, ZInfo(z, h_init, delta.detach(), losses, steps, lookup)
