"""`calculate_hidden_flow`: the causal trace of one fact and one kind, on a registered backend.

The result is the reference's dict (`results.result_dict`): `scores` (tokens × layers, CPU float),
`low_score`, `high_score`, `input_ids`, `input_tokens`, `subject_range`, `answer` (the decoded
top-1 token, unstripped), `window`, `correct_prediction`, and `kind`, stored as the reference does:
"" for hidden states, "mlp" or "attn".

Backends are registered `TraceBackend`s: "reference" (one forward per cell, the test oracle) and
"fast" (the batched engine). Each has a `calculate_hidden_flow` of the reference's signature and,
for fact sets, says whether it runs facts in engine batches; the command line offers what is
registered here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..tokens import _n_leading_specials, answer_token_ids, find_token_range, make_inputs
from .engine import FactInput, TraceEngine
from .kinds import get_kind
from .noise import NoiseSpec, check_noise, draw_noise
from .reference import (answer_probability, predict_from_input, trace_important_states, trace_important_window,
                        trace_with_patch)
from .results import result_dict


@dataclass(frozen=True)
class TraceBackend:
    name: str
    help: str                       # one line for the command line
    hidden_flow: Callable[..., dict]  # calculate_hidden_flow's signature (less `backend`)
    engine: Callable | None = None  # mt -> TraceEngine for fact sets in batches; None: one at a time


BACKENDS: dict[str, TraceBackend] = {}
DEFAULT_BACKEND = "fast"  # the backend used when none is named (the command line's default too)


def register_backend(backend: TraceBackend) -> TraceBackend:
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> TraceBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def check_fact_text(prompt, subject) -> None:
    """The checks of a fact's prompt and subject that need no model (a command line makes them
    before loading one)."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a non-empty string (the text whose next token is traced), "
                         f"got {prompt!r}")
    if not prompt.strip():
        raise ValueError("empty prompt: give the text whose next token is traced")
    if not isinstance(subject, str):
        raise ValueError(f"the subject must be a non-empty string (the words of the prompt to corrupt), "
                         f"got {subject!r}")
    if not subject.strip():
        raise ValueError("empty subject: give the words of the prompt to corrupt")
    if subject != subject.strip():
        # its token range would take in the neighbouring token, which would be corrupted too
        raise ValueError(f"subject {subject!r} has surrounding whitespace: write {subject.strip()!r}")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")


def check_prompt(mt, prompt: str, subject: str) -> list[int]:
    """The prompt's token ids, after the checks that need the model: the prompt fits the model's
    context, is more than one token (restoring the only token's state restores the whole run, so
    every hidden-state score would be the clean probability), and the subject's tokens are found."""
    tok = mt.tokenizer
    ids = tok.encode(prompt)
    limit = mt.adapter.context_length
    if limit is not None and len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of {limit} tokens: "
                         "shorten it")
    if len(ids) - _n_leading_specials(tok) < 2:
        raise ValueError(f"the prompt {prompt!r} is a single token: there is nothing to trace besides "
                         "the subject itself; give a prompt with text after the subject")
    find_token_range(tok, ids, subject)
    return ids


def _validate(prompt, subject, samples, window, token_range, noise=0.1):
    check_fact_text(prompt, subject)
    check_noise(noise)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1 (corrupted runs per pass), got {samples!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (layers restored together), got {window!r}")
    if token_range is not None and not isinstance(token_range, str):
        return [int(t) for t in token_range]
    if token_range not in (None, "subject_last"):
        raise ValueError(f"unknown token_range {token_range!r}: None, 'subject_last' or a list of token indices")
    return token_range


def _token_rows(token_range, subject_range, n_tokens: int) -> list[int] | None:
    """The rows of `scores`: None (every token), or the indices token_range asks for."""
    if token_range == "subject_last":
        return [subject_range[1] - 1]
    if token_range is not None and any(not 0 <= t < n_tokens for t in token_range):
        raise ValueError(f"token_range {token_range} is outside the prompt's {n_tokens} tokens")
    return token_range


def calculate_hidden_flow(mt, prompt: str, subject: str, samples: int = 10, noise: NoiseSpec = 0.1,
                          token_range=None, uniform_noise: bool = False, replace: bool = False,
                          window: int = 10, kind: str | None = None, expect: str | None = None,
                          backend: str = DEFAULT_BACKEND, answer: str | None = None) -> dict:
    """Causal trace of one fact: restore each (token, layer) state of `kind` in turn.

    mt: a ModelAndTokenizer. noise: the std of the Gaussian noise (a float) or a callable applied to
    standard draws (see `noise.resolve_noise` for the reference's rules). token_range: None (every
    token), "subject_last" or a list of token indices (the rows of `scores`). kind: None or
    "hidden" (hidden states), or another registered kind ("mlp", "attn"). expect: when the
    stripped top-1 prediction differs from it, return early with correct_prediction=False and
    what is known by then (no scores). backend: "reference" (one forward per cell) or "fast".
    answer (not in the reference): score this whole answer string instead of the clean top-1
    token: p(answer) is the product of its tokens' probabilities, each read after the prompt and
    the answer's tokens before it (teacher forcing); `expect` is then not checked."""
    chosen = get_backend(backend)
    token_range = _validate(prompt, subject, samples, window, token_range, noise)
    check_prompt(mt, prompt, subject)
    # a backend is a drop-in function: it gets the reference's spelling of the kind
    return chosen.hidden_flow(mt, prompt, subject, samples=samples, noise=noise, token_range=token_range,
                              uniform_noise=uniform_noise, replace=replace, window=window,
                              kind=get_kind(kind).argument, expect=expect,
                              **({} if answer is None else {"answer": answer}))


def calculate_hidden_flow_reference(mt, prompt: str, subject: str, samples: int = 10, noise=0.1,
                                    token_range=None, uniform_noise: bool = False, replace: bool = False,
                                    window: int = 10, kind=None, expect=None, answer=None) -> dict:
    """`calculate_hidden_flow` as the reference computes it: one forward pass per cell."""
    kind = get_kind(kind)
    if answer is not None:
        return _whole_answer_reference(mt, prompt, subject, samples, noise, token_range, uniform_noise,
                                       replace, window, kind, answer)
    inp = make_inputs(mt.tokenizer, [prompt] * (samples + 1), device=mt.device)
    answer_t, base_score = [d[0] for d in predict_from_input(mt.model, inp)]
    input_ids = inp["input_ids"][0].cpu()
    common = dict(answer=int(answer_t), high_score=base_score.item(), window=window, kind=kind)
    if expect is not None and mt.tokenizer.decode([int(answer_t)]).strip() != expect:
        return result_dict(mt.tokenizer, input_ids, **common)
    e_range = find_token_range(mt.tokenizer, input_ids.tolist(), subject)
    rows = _token_rows(token_range, e_range, len(input_ids))
    # As the reference, the corrupted baseline always adds the noise, even when `replace` is set.
    low_score = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=noise,
                                 uniform_noise=uniform_noise).item()
    args = dict(noise=noise, uniform_noise=uniform_noise, replace=replace, token_range=rows)
    if kind.argument is None:
        scores = trace_important_states(mt.model, mt.num_layers, inp, e_range, answer_t, **args)
    else:
        scores = trace_important_window(mt.model, mt.num_layers, inp, e_range, answer_t,
                                        kind=kind.argument, window=window, **args)
    return result_dict(mt.tokenizer, input_ids, scores=scores.detach().cpu(), low_score=low_score,
                       subject_range=e_range, **common)


def _whole_answer_reference(mt, prompt, subject, samples, noise, token_range, uniform_noise, replace,
                            window, kind, answer) -> dict:
    """The reference path scoring a whole answer: the prompt and the answer's tokens but the last
    run together; the rows are the prompt's tokens."""
    prompt_ids = mt.tokenizer.encode(prompt)
    answer_ids = answer_token_ids(mt.tokenizer, answer)
    run = torch.tensor([prompt_ids + answer_ids[:-1]] * (samples + 1), device=mt.device)
    inp = dict(input_ids=run, attention_mask=torch.ones_like(run))
    e_range = find_token_range(mt.tokenizer, prompt_ids, subject)
    rows = _token_rows(token_range, e_range, len(prompt_ids)) or list(range(len(prompt_ids)))
    with torch.no_grad():
        clean = torch.cat([mt.model(**inp).logits[:1]] * 2)  # row 1 stands for "the rows after 0"
    high = answer_probability(clean, answer_ids, whole_answer=True).item()
    low = trace_with_patch(mt.model, inp, [], answer_ids, e_range, noise=noise, uniform_noise=uniform_noise,
                           whole_answer=True).item()
    args = dict(noise=noise, uniform_noise=uniform_noise, replace=replace, token_range=rows, whole_answer=True)
    if kind.argument is None:
        scores = trace_important_states(mt.model, mt.num_layers, inp, e_range, answer_ids, **args)
    else:
        scores = trace_important_window(mt.model, mt.num_layers, inp, e_range, answer_ids,
                                        kind=kind.argument, window=window, **args)
    out = result_dict(mt.tokenizer, prompt_ids, answer_ids[0], high, window, kind, scores=scores.detach().cpu(),
                      low_score=low, subject_range=e_range)
    out["answer"] = mt.tokenizer.decode(answer_ids)  # the whole answer scored, not its first token
    return out


def make_fact_input(mt, prompt: str, subject: str, samples: int, noise, uniform_noise: bool = False,
                    token_range=None, answer: str | None = None) -> FactInput:
    """Tokens, subject range and the reference's noise draw for one fact, for the engine (answer:
    a whole answer string to score, else the clean top-1 token)."""
    ids = check_prompt(mt, prompt, subject)
    b, e = find_token_range(mt.tokenizer, ids, subject)
    return FactInput(ids, (b, e), draw_noise(samples, e - b, mt.adapter.hidden_size, noise, uniform_noise),
                     tokens=_token_rows(token_range, (b, e), len(ids)),
                     answer=None if answer is None else answer_token_ids(mt.tokenizer, answer))


def fact_dict(mt, fact: FactInput, res, kind, window: int, traced: bool = True) -> dict:
    """The reference's result dict of one engine result (`traced=False`: a mispredicted fact)."""
    known = dict(answer=res.answer, high_score=res.high_score, window=window, kind=kind)
    if not traced:
        return result_dict(mt.tokenizer, fact.input_ids, **known)
    return result_dict(mt.tokenizer, fact.input_ids, scores=res.scores[get_kind(kind).name],
                       low_score=res.low_score, subject_range=fact.subject_range, **known)


def calculate_hidden_flow_fast(mt, prompt: str, subject: str, samples: int = 10, noise=0.1,
                               token_range=None, uniform_noise: bool = False, replace: bool = False,
                               window: int = 10, kind=None, expect=None, engine: TraceEngine | None = None,
                               answer=None) -> dict:
    """`calculate_hidden_flow` on the fast engine: the same arguments and the same dict."""
    kind = get_kind(kind)
    engine = engine or TraceEngine(mt)
    fact = make_fact_input(mt, prompt, subject, samples, noise, uniform_noise, token_range, answer)
    if expect is not None and answer is None:  # the reference checks the prediction before tracing anything
        res = engine.trace([fact], kinds=(), window=window)[0]
        if mt.tokenizer.decode([res.answer]).strip() != expect:
            return fact_dict(mt, fact, res, kind, window, traced=False)
    res = engine.trace([fact], kinds=(kind.name,), window=window, replace=replace)[0]
    out = fact_dict(mt, fact, res, kind, window)
    if answer is not None:
        out["answer"] = mt.tokenizer.decode(res.answer_ids)
    return out


register_backend(TraceBackend("reference", "one forward pass per cell, as the reference (the oracle)",
                              calculate_hidden_flow_reference))
register_backend(TraceBackend("fast", "the batched engine: many cells and facts per pass",
                              calculate_hidden_flow_fast, engine=TraceEngine))
