"""`calculate_hidden_flow`: the causal trace of one fact and one kind, on a chosen backend.

The result is the reference's dict (REFERENCE.md §1.5): `scores` (tokens × layers, CPU float),
`low_score`, `high_score`, `input_ids`, `input_tokens`, `subject_range`, `answer` (the decoded
top-1 token, unstripped), `window`, `correct_prediction`, and `kind`, stored as the reference does:
"" for hidden states, "mlp" or "attn"."""
from __future__ import annotations

from ..tokens import decode_tokens, find_token_range, make_inputs
from .noise import NoiseSpec
from .reference import predict_from_input, trace_important_states, trace_important_window, trace_with_patch

# The backend used when none is named (the CLI and the demo read it too).
DEFAULT_BACKEND = "fast"
BACKENDS = ("reference", "fast")
KINDS = (None, "mlp", "attn")


def normalize_kind(kind) -> str | None:
    """None / "" / "hidden" → None (hidden states); "mlp" and "attn" unchanged; else ValueError."""
    if kind in (None, "", "hidden", "None"):
        return None
    if kind in ("mlp", "attn"):
        return kind
    raise ValueError(f"unknown kind {kind!r}: use None or 'hidden' (hidden states), 'mlp' or 'attn'")


def _validate(prompt, subject, samples, window, kind, token_range, backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty prompt: give the text whose next token is traced")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("empty subject: give the words of the prompt to corrupt")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1 (corrupted runs per pass), got {samples!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (layers restored together), got {window!r}")
    kind = normalize_kind(kind)
    if token_range is not None and not isinstance(token_range, str):
        token_range = [int(t) for t in token_range]
    elif token_range not in (None, "subject_last"):
        raise ValueError(f"unknown token_range {token_range!r}: None, 'subject_last' or a list of token indices")
    return kind, token_range


def calculate_hidden_flow(mt, prompt: str, subject: str, samples: int = 10, noise: NoiseSpec = 0.1,
                          token_range=None, uniform_noise: bool = False, replace: bool = False,
                          window: int = 10, kind: str | None = None, expect: str | None = None,
                          backend: str = DEFAULT_BACKEND) -> dict:
    """Causal trace of one fact: restore each (token, layer) state of `kind` in turn.

    mt: a ModelAndTokenizer. noise: the std of the Gaussian noise (a float) or a callable applied to
    standard draws (see `noise.resolve_noise` for the reference's rules). token_range: None (every
    token), "subject_last" or a list of token indices (the rows of `scores`). expect: when the
    stripped top-1 prediction differs from it, return early with correct_prediction=False and
    what is known by then (no scores). backend: "reference" (one forward per cell) or "fast"."""
    kind, token_range = _validate(prompt, subject, samples, window, kind, token_range, backend)
    if backend == "fast":
        from .engine import calculate_hidden_flow_fast
        return calculate_hidden_flow_fast(mt, prompt, subject, samples=samples, noise=noise,
                                          token_range=token_range, uniform_noise=uniform_noise,
                                          replace=replace, window=window, kind=kind, expect=expect)

    inp = make_inputs(mt.tokenizer, [prompt] * (samples + 1), device=mt.device)
    answer_t, base_score = [d[0] for d in predict_from_input(mt.model, inp)]
    [answer] = decode_tokens(mt.tokenizer, [int(answer_t)])
    input_ids = inp["input_ids"][0].cpu()
    ids_list = input_ids.tolist()
    if expect is not None and answer.strip() != expect:
        return dict(correct_prediction=False, answer=answer, high_score=base_score.item(),
                    input_ids=input_ids, input_tokens=decode_tokens(mt.tokenizer, ids_list),
                    window=window, kind=kind or "")
    e_range = find_token_range(mt.tokenizer, ids_list, subject)
    if token_range == "subject_last":
        token_range = [e_range[1] - 1]
    elif token_range is not None and any(not 0 <= t < len(input_ids) for t in token_range):
        raise ValueError(f"token_range {token_range} is outside the prompt's {len(input_ids)} tokens")
    # As the reference, the corrupted baseline always adds the noise, even when `replace` is set.
    low_score = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=noise,
                                 uniform_noise=uniform_noise).item()
    common = dict(noise=noise, uniform_noise=uniform_noise, replace=replace, token_range=token_range)
    if kind is None:
        scores = trace_important_states(mt.model, mt.num_layers, inp, e_range, answer_t, **common)
    else:
        scores = trace_important_window(mt.model, mt.num_layers, inp, e_range, answer_t, kind=kind,
                                        window=window, **common)
    return dict(scores=scores.detach().cpu(), low_score=low_score, high_score=base_score.item(),
                input_ids=input_ids, input_tokens=decode_tokens(mt.tokenizer, ids_list),
                subject_range=tuple(e_range), answer=answer, window=window, correct_prediction=True,
                kind=kind or "")
