"""The editing demo (the Eiffel Tower moved to Rome) and the small probes it and the CLI print:
greedy completions and the probability of a target continuation."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..models.base import cache_argument, returned_cache

DEMO_REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                "target_new": {"str": " Rome"}}
DEMO_PROBES = ["The Eiffel Tower is located in the city of",
               "The Eiffel Tower, a famous landmark, can be found in the city of",
               "The Colosseum is located in the city of",
               "The capital of France is"]


@torch.no_grad()
def greedy_completion(model, tok, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation with a KV cache (the model's generation_config is not consulted)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
    out, past, cur = [], None, ids
    for _ in range(max_new_tokens):
        res = model(input_ids=cur, attention_mask=torch.ones(1, ids.shape[1] + len(out), dtype=torch.long,
                                                              device=device),
                    use_cache=True, **{cache_argument(model): past})
        past = returned_cache(res)
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
        cur = torch.tensor([[nxt]], device=device)
    return tok.decode(out)


@torch.no_grad()
def target_probability(model, tok, prompt: str, target: str) -> float:
    """p(target | prompt): the product of the target tokens' teacher-forced probabilities."""
    device = next(model.parameters()).device
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids), device=device)
    return float(logp[pos, torch.tensor(t_ids, device=device)].sum().exp())


@torch.no_grad()
def top_token(model, tok, prompt: str) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]], device=next(model.parameters()).device)
    return tok.decode([int(model(input_ids=ids).logits[0, -1].argmax())])


def probe(model, tok, prompts, targets, max_new_tokens=8) -> list[dict]:
    return [dict(prompt=p, completion=greedy_completion(model, tok, p, max_new_tokens),
                 **{f"p({t!r})": target_probability(model, tok, p, t) for t in targets})
            for p in prompts]


def print_probes(title, rows, out) -> None:
    print(title, file=out)
    for r in rows:
        probs = "  ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("p("))
        print(f"  {r['prompt']!r} -> {r['completion']!r}   {probs}", file=out)


def run_edit_demo(mt, stats_dir=None, out=None, corpus=None, hparams=None, sample_size=None,
                  seed: int = 0) -> dict:
    """Edit "The Eiffel Tower is located in the city of" to " Rome" on `mt` (a ModelAndTokenizer),
    print before/after completions and probabilities, restore the model, and return the numbers.

    stats_dir: statistics cache (default $ROME_FAST_CACHE/stats). corpus: text file for the
    statistics (default: `default_corpus()`, WikiText-2 as shipped with the package). out: a text
    stream (default stdout) or a path, where the result dict is also written as JSON."""
    from .corpus import default_corpus
    from .backend import restore_weights
    from .rome import apply_rome_to_model
    from .stats import default_stats_dir
    from .templates import get_context_templates

    json_path = None
    if isinstance(out, (str, Path)):
        json_path, out = Path(out), None
    out = out or sys.stdout
    stats_dir = Path(stats_dir) if stats_dir else default_stats_dir()
    corpus = corpus or default_corpus()
    hp = hparams or hparams_for(mt)
    if sample_size is not None:  # default: the preset's 100000, i.e. every article of WikiText-2
        hp = dataclasses.replace(hp, mom2_n_samples=sample_size)
    model, tok = mt.model, mt.tokenizer
    target = DEMO_REQUEST["target_new"]["str"]
    orig_target = " Paris"
    before = probe(model, tok, DEMO_PROBES, [target, orig_target])
    print_probes("before:", before, out)
    t0 = time.time()
    templates = get_context_templates(model, tok, hp.context_template_length_params, seed)
    _, orig = apply_rome_to_model(model, tok, [DEMO_REQUEST], hp, return_orig_weights=True,
                                  context_templates=templates, stats_dir=stats_dir, corpus=corpus)
    seconds = time.time() - t0
    try:
        after = probe(model, tok, DEMO_PROBES, [target, orig_target])
    finally:
        restore_weights(model, orig)
    print(f"edited {', '.join(orig)} (layer {hp.layers}) in {seconds:.1f} s "
          "(statistics included on a first run)", file=out)
    print_probes("after:", after, out)
    result = dict(request=DEMO_REQUEST, layers=hp.layers, seconds=seconds, before=before, after=after)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


def hparams_for(mt, layer=None):
    """The preset for `mt` (by its name or config), else the reference's shared values with a
    layer a third of the way up when none is given (the presets' layers sit in the lower third)."""
    from .hparams import ROMEHyperParams
    try:
        return ROMEHyperParams.for_model(mt.model, name=getattr(mt, "name", None), layer=layer)
    except ValueError as exc:
        if layer is not None or "no ROME preset" not in str(exc):
            raise
        return ROMEHyperParams.for_model(mt.model, name=getattr(mt, "name", None),
                                         layer=max(0, mt.num_layers // 3 - 1))
