"""Probability metrics of an edit (CounterFact, zsRE) and their aggregation.

Scoring a target o after a prefix: the token ids are `tok(prefix)` followed by
`tok(" " + o)` (no special tokens), so o's tokens are exactly those of " " + o whatever the
tokenizer does at the join, and a BOS-adding tokenizer puts BOS only at the start. (The reference
tokenises the joined string `prefix + " " + o` and then reads o's tokens at offsets from
len(tok(prefix)); the two agree whenever tokenisation does not merge across the join, which is
the case for GPT-2-style BPE after a word boundary.)

CounterFact stores the mean negative log-likelihood of o's tokens per prompt, as the reference
does: {"target_new": nll_new, "target_true": nll_true}. P(o) = exp(-mean NLL) is the geometric
mean of o's token probabilities, which length-normalises multi-token targets.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

DEFAULT_BATCH = 32  # sequences per forward pass; records have ~6-40, so usually one pass


# ---------------------------------------------------------------------------------------------
# Token ids and batched forward passes

def prefix_ids(tok, prefix: str) -> list[int]:
    ids = tok(prefix)["input_ids"]
    if not ids:
        raise ValueError(f"empty prompt {prefix!r}: nothing to condition on")
    return list(ids)


def target_ids(tok, target: str) -> list[int]:
    """Tokens of " " + target, without special tokens."""
    ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} has no tokens")
    return list(ids)


def _pad_id(tok) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pad is None else int(pad)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _forward_right_padded(model, seqs: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Logits (B, T, V) of right-padded sequences. Right padding leaves every real position's
    logits unchanged under a causal mask, so no position ids are needed."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits


def target_nll(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = DEFAULT_BATCH,
               return_correct: bool = False):
    """Mean per-token NLL (nats) of each target after its prefix: pairs = [(prefix, target)].
    return_correct=True also returns, per pair, whether every target token is the arg-max under
    teacher forcing (read from the same forward): (nlls, corrects)."""
    pad = _pad_id(tok)
    out: list[float] = []
    correct: list[bool] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        pre = [prefix_ids(tok, p) for p, _ in chunk]
        tgt = [target_ids(tok, t) for _, t in chunk]
        logits = _forward_right_padded(model, [p + t for p, t in zip(pre, tgt)], pad)
        for i, (p, t) in enumerate(zip(pre, tgt)):
            # the logits at position k predict token k+1
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=logits.device)
            logp = torch.log_softmax(logits[i, pos].float(), dim=-1)
            t_ids = torch.tensor(t, device=logits.device)
            nll = -logp[torch.arange(len(t), device=logits.device), t_ids]
            out.append(nll.mean().item())
            correct.append(bool((logits[i, pos].argmax(-1) == t_ids).all()))
    return (out, correct) if return_correct else out


def token_accuracy(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = DEFAULT_BATCH) -> list[list[bool]]:
    """Teacher-forced token accuracy: for each (prefix, target) and each token j of " " + target,
    whether the arg-max after prefix + target[:j] is target[j] (the reference's zsRE rule). One forward
    per sequence covers all j, since a causal model's prediction at a position only sees the
    tokens before it. (The reference re-tokenises prefix + decode(target[:j]) as a string for
    each j and compares with the first token of tok(decode(target[j])); that equals this
    whenever tokenisation is concatenative, and avoids its BOS-token bug.)"""
    pad = _pad_id(tok)
    out: list[list[bool]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        pre = [prefix_ids(tok, p) for p, _ in chunk]
        tgt = [target_ids(tok, t) for _, t in chunk]
        logits = _forward_right_padded(model, [p + t[:-1] for p, t in zip(pre, tgt)], pad)
        for i, (p, t) in enumerate(zip(pre, tgt)):
            pred = logits[i, len(p) - 1:len(p) - 1 + len(t)].argmax(-1).tolist()
            out.append([a == b for a, b in zip(pred, t)])
    return out


# ---------------------------------------------------------------------------------------------
# Per-record metrics (what goes into a case file's "pre" / "post")

def counterfact_probs(model, tok, record, batch_size: int = DEFAULT_BATCH, accuracy: bool = False) -> dict:
    """Mean NLLs of target_new and target_true for the rewrite, paraphrase, neighbourhood and
    attribute prompts, in one batched pass: {"<kind>_prompts_probs": [{"target_new",
    "target_true"}]}. A neighbourhood prompt's true target is its own (full CounterFact: the
    edited fact's true object; compact: locality_ground_truth).

    accuracy=True adds the mass-editing evaluation's teacher-forced accuracies, from the same
    pass: "{rewrite,paraphrase}_prompts_correct" (every token of target_new is the arg-max) and
    "neighborhood_prompts_correct" (every token of the prompt's true target is), one bool per
    prompt."""
    return counterfact_probs_many(model, tok, [record], batch_size, accuracy)[0]


def _counterfact_groups(record) -> dict:
    true = record.target_true
    return {
        "rewrite_prompts": [(record.rewrite_prompt, true)],
        "paraphrase_prompts": [(p, true) for p in record.paraphrase_prompts],
        "neighborhood_prompts": [(n["prompt"], n["target"]) for n in record.neighborhood_prompts],
        "attribute_prompts": [(p, true) for p in record.attribute_prompts],
    }


def counterfact_probs_many(model, tok, records, batch_size: int = DEFAULT_BATCH, accuracy: bool = False) -> list[dict]:
    """`counterfact_probs` of several records, their sequences sharing forward passes (a
    compact record has only six short ones, too few to fill a pass on its own). Right padding
    leaves each sequence's logits what they are alone, up to rounding."""
    groups = [_counterfact_groups(r) for r in records]
    pairs = [(p, o) for r, g in zip(records, groups) for items in g.values() for p, t in items
             for o in (r.target_new, t)]
    nll, ok = target_nll(model, tok, pairs, batch_size, return_correct=True) if pairs else ([], [])
    outs, k = [], 0
    for g in groups:
        out = {}
        for key, items in g.items():
            out[f"{key}_probs"] = [{"target_new": nll[k + 2 * i], "target_true": nll[k + 2 * i + 1]}
                                   for i in range(len(items))]
            if accuracy and key != "attribute_prompts":  # new target; the neighbours' own true one
                out[f"{key}_correct"] = [ok[k + 2 * i + (key == "neighborhood_prompts")] for i in range(len(items))]
            k += 2 * len(items)
        outs.append(out)
    return outs


def zsre_correct(model, tok, record, batch_size: int = DEFAULT_BATCH) -> dict:
    """Teacher-forced token accuracy of target_new after the rewrite and paraphrase prompts, and
    of the NQ answer after the neighbourhood question: {"<kind>_prompts_correct": [bool per
    token]} (flattened over prompts, as the reference)."""
    return zsre_correct_many(model, tok, [record], batch_size)[0]


def zsre_correct_many(model, tok, records, batch_size: int = DEFAULT_BATCH) -> list[dict]:
    """`zsre_correct` of several records, their sequences sharing forward passes."""
    groups = [{
        "rewrite_prompts": [(r.rewrite_prompt, r.target_new)],
        "paraphrase_prompts": [(p, r.target_new) for p in r.paraphrase_prompts],
        "neighborhood_prompts": [(n["prompt"], n["target"]) for n in r.neighborhood_prompts],
    } for r in records]
    pairs = [pt for g in groups for items in g.values() for pt in items]
    acc = token_accuracy(model, tok, pairs, batch_size) if pairs else []
    outs, k = [], 0
    for g in groups:
        out = {}
        for key, items in g.items():
            out[f"{key}_correct"] = [c for row in acc[k:k + len(items)] for c in row]
            k += len(items)
        outs.append(out)
    return outs


def counterfact_case_scores(metrics: dict) -> dict:
    """Per-record ES/EM, PS/PM, NS/NM as fractions (summarize.py's success/diff):
    ES = mean [P(new) > P(true)], EM = mean P(new) - P(true) over the rewrite prompts; PS/PM the
    same over the paraphrases; NS = mean [P(true) > P(new)], NM = mean P(true) - P(new) over the
    neighbourhood prompts. Strict comparisons, so a tie counts as a failure."""
    def success(rows, new_wins):
        return float(np.mean([(r["target_true"] > r["target_new"]) if new_wins else
                              (r["target_true"] < r["target_new"]) for r in rows]))

    def margin(rows, new_wins):
        d = [math.exp(-r["target_new"]) - math.exp(-r["target_true"]) for r in rows]
        return float(np.mean(d if new_wins else [-x for x in d]))

    out = {}
    for short, key, new_wins in (("ES", "rewrite", True), ("PS", "paraphrase", True),
                                 ("NS", "neighborhood", False)):
        rows = metrics.get(f"{key}_prompts_probs") or []
        if rows:
            out[short] = success(rows, new_wins)
            out[short[0] + "M"] = margin(rows, new_wins)
        correct = metrics.get(f"{key}_prompts_correct")
        if correct:  # the teacher-forced accuracies (mass-editing runs)
            out[f"{key}_acc"] = float(np.mean(correct))
    for key in ("ngram_entropy", "reference_score", "essence_score"):
        if key in metrics:
            out[{"ngram_entropy": "GE", "reference_score": "RS", "essence_score": "essence"}[key]] = metrics[key]
    return out


def zsre_case_scores(metrics: dict) -> dict:
    """Per-record Efficacy / Paraphrase / Specificity: mean token accuracy of each group."""
    out = {}
    for short, key in (("Efficacy", "rewrite"), ("Paraphrase", "paraphrase"),
                       ("Specificity", "neighborhood")):
        rows = metrics.get(f"{key}_prompts_correct") or []
        if rows:
            out[short] = float(np.mean(rows))
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation over records

def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean of non-negative numbers; 0 if any is 0 (its limit), NaN if none."""
    v = [float(x) for x in values]
    if not v or any(math.isnan(x) for x in v):
        return float("nan")
    if any(x < 0 for x in v):
        raise ValueError(f"harmonic mean of negative values {v}")
    if any(x == 0 for x in v):
        return 0.0
    return len(v) / sum(1 / x for x in v)


def mean_std_ci(values: Sequence[float], scale: float = 100.0) -> dict:
    """{"mean", "std", "ci95", "n"} ×scale; std is the population std (np.std, as summarize.py),
    ci95 = 1.96·std/√n as in the paper's tables."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    std = float(a.std())
    return {"mean": float(a.mean()) * scale, "std": std * scale,
            "ci95": 1.96 * std / math.sqrt(a.size) * scale, "n": int(a.size)}


CF_KEYS = ("ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "essence", "rewrite_acc", "paraphrase_acc",
           "neighborhood_acc")
ZSRE_KEYS = ("Efficacy", "Paraphrase", "Specificity")


def aggregate(per_record: Sequence[dict], keys: Sequence[str] = CF_KEYS) -> dict:
    """Mean/std/CI (×100) of each per-record score present; for CounterFact also the score
    S = harmonic mean of the aggregate ES, PS and NS (in %). essence_score is a perplexity and
    is not scaled."""
    out = {}
    for k in keys:
        vals = [r[k] for r in per_record if k in r and r[k] is not None]
        if vals:
            out[k] = mean_std_ci(vals, scale=1.0 if k == "essence" else 100.0)
    if all(k in out for k in ("ES", "PS", "NS")):
        out["S"] = harmonic_mean([out["ES"]["mean"], out["PS"]["mean"], out["NS"]["mean"]])
    return out
