"""The key / left vector u (docs/editing.md, "Keys"): k̄ = mean over the context templates of the
rewrite module's input at the subject's key token; u = C⁻¹ k̄ / ‖C⁻¹ k̄‖ with C = E[k kᵀ]."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import adapter_for
from ..tokens import get_words_idxs_in_templates
from ..hooks import Trace
from .corpus import local_corpus
from .covariance import describe, edit_covariance
from .sites import edit_sites
from .stats import corpus_ds_name, layer_stats, stats_model_name

_INV_COV: dict = {}
CHUNK = 512  # rows per forward when collecting keys, as the reference


def right_padded(tok, texts, device):
    """Token ids (with the tokenizer's own special tokens) right-padded with the pad token, and
    the attention mask: the index arithmetic of the reference assumes right padding."""
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def key_indices(tok, templates, subject, fact_token: str) -> list[int]:
    """Per template (with "{}" for the subject): the token whose key is read. `subject`: one
    string for every template, or a list with one per template."""
    subjects = [subject] * len(templates) if isinstance(subject, str) else list(subject)
    if fact_token == "last":
        return [len(tok(t.format(s))["input_ids"]) - 1 for t, s in zip(templates, subjects)]
    if not fact_token.startswith("subject_"):
        raise ValueError(f"unknown fact_token {fact_token!r}")
    idxs = get_words_idxs_in_templates(tok, templates, subjects, fact_token[len("subject_"):])
    return [i[0] for i in idxs]


@torch.no_grad()
def module_io_at(model, tok, module_name: str, templates, subject, fact_token: str,
                 stop: bool = False):
    """(inputs, outputs) of `module_name` at the key token of each filled template: (n, d_in),
    (n, d_out). The reference's get_reprs_at_word_tokens / get_module_input_output_at_word(s).
    `subject`: one string, or one per template. `stop` ends each forward right after the module
    (nothing above it affects the result)."""
    subjects = [subject] * len(templates) if isinstance(subject, str) else list(subject)
    idxs = key_indices(tok, templates, subjects, fact_token)
    device = next(model.parameters()).device
    ins, outs = [], []
    for s in range(0, len(templates), CHUNK):
        part = templates[s:s + CHUNK]
        ids, mask = right_padded(tok, [t.format(w) for t, w in zip(part, subjects[s:s + CHUNK])], device)
        with Trace(model, module_name, retain_input=True, retain_output=True, detach=True, stop=stop) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        rows = torch.arange(len(part), device=device)
        at = torch.tensor(idxs[s:s + CHUNK], device=device)
        x, y = tr.input, tr.output  # a block's input/output may be a tuple: its hidden states first
        x, y = (x[0] if isinstance(x, tuple) else x), (y[0] if isinstance(y, tuple) else y)
        ins.append(x[rows, at])
        outs.append(y[rows, at])
    return torch.cat(ins), torch.cat(outs)


def get_inv_cov(model, tok, layer_name: str, stats_dir, ds_name, sample_size, dtype="float32",
                corpus=None, model_name=None, progress=True, ridge=None) -> torch.Tensor:
    """C⁻¹ in float32 on the model's device via `torch.inverse` (as the reference), cached for the
    process per model, layer and statistics identity. The statistics are checked first
    (covariance.py: enough keys, positive definite; a StatisticsError otherwise) unless `ridge`
    regularises them explicitly."""
    model_name = model_name or stats_model_name(model)
    where = (str(Path(stats_dir).resolve()) if stats_dir else
             str(corpus) if isinstance(corpus, (str, Path)) else id(corpus))
    key = (model_name, layer_name, where, ds_name, sample_size, dtype, ridge)
    if key not in _INV_COV:
        stat = layer_stats(model, tok, layer_name, stats_dir, ds_name, to_collect=("mom2",),
                           sample_size=sample_size, precision=dtype, corpus=corpus,
                           model_name=model_name, progress=progress)
        device = next(model.parameters()).device
        C, _ = edit_covariance(stat.mom2, adapter_for(model).linear_io(layer_name)[0],
                               describe(stat.path, layer_name), ridge, device)
        _INV_COV[key] = invert_mom2(C, stat.path or layer_name)
    return _INV_COV[key]


def invert_mom2(mom2: torch.Tensor, where="") -> torch.Tensor:
    inv = torch.inverse(mom2.float()).float()
    if not torch.isfinite(inv).all():
        raise ValueError(f"the second moment of {where} is singular (too few tokens in the statistics "
                         f"for a {mom2.shape[0]}-wide key?): collect more samples")
    return inv


def clear_cache() -> None:
    _INV_COV.clear()


def template_keys(model, tok, request: dict, hparams, layer: int, context_templates) -> torch.Tensor:
    """The keys of every context template filled with the request's prompt and subject: (n, d_in)."""
    templates = [c.format(request["prompt"]) for c in context_templates]
    (site,) = edit_sites(model, hparams, [layer])
    k, _ = module_io_at(model, tok, site.rewrite, templates, request["subject"], hparams.fact_token)
    return k


def compute_u(model, tok, request: dict, hparams, layer: int, context_templates, stats_dir=None,
              corpus=None, inv_cov: torch.Tensor | None = None, model_name=None,
              return_key: bool = False, progress=True):
    """u = C⁻¹ k̄ / ‖C⁻¹ k̄‖ (k̄ / ‖k̄‖ without mom2_adjustment). `inv_cov` supplies C⁻¹ directly;
    otherwise it comes from the statistics (`stats_dir` cache, `corpus`, hparams.mom2_*).
    With return_key=True returns (u, k̄)."""
    k_bar = template_keys(model, tok, request, hparams, layer, context_templates).mean(0)
    u = k_bar
    if hparams.mom2_adjustment:
        if inv_cov is None:
            corpus = local_corpus(corpus, hparams.mom2_dataset)  # mom2_dataset may be a text file
            inv_cov = get_inv_cov(model, tok, adapter_for(model).rewrite_name(layer), stats_dir,
                                  corpus_ds_name(corpus, hparams.mom2_dataset), hparams.mom2_n_samples,
                                  hparams.mom2_dtype, corpus, model_name, progress, hparams.mom2_ridge)
        if inv_cov.shape != (k_bar.numel(), k_bar.numel()):
            raise ValueError(f"inverse second moment is {tuple(inv_cov.shape)} but the key width of "
                             f"layer {layer} is {k_bar.numel()}")
        u = inv_cov.to(k_bar.device, torch.float32) @ k_bar.float()
    u = u.float() / u.float().norm()
    return (u, k_bar) if return_key else u
