"""Edit requests: the reference's format, validated before anything is edited (docs/editing.md,
"Requests").

    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
     "target_new": {"str": " Rome"}}

The prompt holds exactly one "{}" where the subject goes; any other literal brace is written
doubled ("{{", "}}"), as in str.format, because the prompt is formatted with the subject."""
from __future__ import annotations

import copy

from ..tokens import split_template
from .compute_u import key_indices

KEY_MODES = ("reference", "r-rome")


def check_key_mode(key_mode: str) -> str:
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key_mode {key_mode!r}: one of {KEY_MODES}")
    return key_mode


def normalize_request(request: dict) -> dict:
    """A validated copy of a request in the reference's format, the target with a leading space."""
    if not isinstance(request, dict):
        raise ValueError(f"a request is a dict with prompt, subject and target_new, not {type(request).__name__}")
    for key in ("prompt", "subject", "target_new"):
        if key not in request:
            raise ValueError(f"request is missing {key!r}: {request!r}")
    prompt, subject, target = request["prompt"], request["subject"], request["target_new"]
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"request subject must be a non-empty string, got {subject!r}")
    if subject != subject.strip():
        raise ValueError(f"request subject {subject!r} has surrounding whitespace: the key is read at "
                         f"its last token, so write {subject.strip()!r} (the prompt holds the spaces)")
    try:
        before, _ = split_template(prompt, "request prompt")
    except ValueError as exc:
        hint = (f" (the subject is already in it: write {prompt.replace(subject, '{}', 1)!r})"
                if isinstance(prompt, str) and "{}" not in prompt and subject in prompt else "")
        raise ValueError(f"{exc}{hint}") from None
    if before and not before.endswith(" "):
        raise ValueError(f"the text before '{{}}' in the prompt must end with a space: {prompt!r}")
    if isinstance(target, dict):
        target = target.get("str")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"request target_new must be a non-empty string (target_new['str']), got {target!r}")
    out = copy.deepcopy(request)
    out["target_new"] = dict(request["target_new"]) if isinstance(request["target_new"], dict) else {}
    out["target_new"]["str"] = target if target.startswith(" ") else " " + target
    return out


def check_requests(tok, requests, fact_token: str, context: int | None = None, room: int = 0) -> list[dict]:
    """Every request normalised and checked against the tokenizer (the target tokenises to
    something, the key token can be found, and with `context` (the model's positions) the prompt
    and its target fit it with `room` tokens to spare for a context template); the first bad one
    is a ValueError naming it."""
    if isinstance(requests, dict):
        requests = [requests]
    out = []
    for i, r in enumerate(requests):
        try:
            r = normalize_request(r)
            target_token_ids(tok, r["target_new"]["str"])
            key_indices(tok, [r["prompt"]], r["subject"], fact_token)
            if context is not None:
                n = len(tok(r["prompt"].format(r["subject"]) + r["target_new"]["str"])["input_ids"])
                if n + room > context:
                    raise ValueError(f"the prompt with its target is {n} tokens; with {room} more for a context "
                                     f"template that exceeds the model's context of {context} tokens: shorten it")
        except ValueError as exc:
            raise ValueError(f"request {i}: {exc}") from None
        out.append(r)
    return out


def target_token_ids(tok, target: str) -> list[int]:
    """The target's token ids, without special tokens (it continues a prompt)."""
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids
