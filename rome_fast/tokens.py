"""Token-level helpers with the reference's names: batching prompts, decoding, and locating a
subject's tokens (docs/tracing.md) and its key position (docs/editing.md)."""
from __future__ import annotations

import string
from typing import Sequence

import torch


def make_inputs(tokenizer, prompts: Sequence[str], device="cpu") -> dict:
    """Tokenise prompts into a left-padded batch (pad id 0, as the reference) with a mask."""
    if isinstance(prompts, str):
        prompts = [prompts]
    token_lists = [tokenizer.encode(p) for p in prompts]
    if any(len(t) == 0 for t in token_lists):
        raise ValueError("empty prompt: there is nothing to run the model on")
    maxlen = max(len(t) for t in token_lists)
    pad = 0
    input_ids = [[pad] * (maxlen - len(t)) + t for t in token_lists]
    attention_mask = [[0] * (maxlen - len(t)) + [1] * len(t) for t in token_lists]
    return dict(input_ids=torch.tensor(input_ids, device=device),
                attention_mask=torch.tensor(attention_mask, device=device))


def decode_tokens(tokenizer, token_array) -> list:
    """Each token decoded on its own; nested batches give nested lists."""
    if hasattr(token_array, "tolist"):  # tensors and arrays, of one prompt or a batch
        token_array = token_array.tolist()
    if isinstance(token_array, int):
        raise ValueError("decode_tokens takes a sequence of token ids, not a single id")
    if len(token_array) and isinstance(token_array[0], (list, tuple)):
        return [decode_tokens(tokenizer, row) for row in token_array]
    return [tokenizer.decode([int(t)]) for t in token_array]


def find_token_range(tokenizer, token_array, substring: str) -> tuple[int, int]:
    """[start, end) token indices covering the first occurrence of `substring` in the decoded
    prompt: tokens are decoded one by one and concatenated; start is the first token whose running
    length passes the match's first character, end the first that reaches its last."""
    if not isinstance(substring, str) or not substring.strip():
        raise ValueError("subject must be a non-empty string")
    toks = decode_tokens(tokenizer, token_array)
    if toks and isinstance(toks[0], list):
        raise ValueError("find_token_range takes the token ids of one prompt, not a batch")
    text = "".join(toks)
    char_start = text.find(substring)
    if char_start < 0:
        raise ValueError(f"subject {substring!r} does not occur in the prompt {text!r}")
    char_end = char_start + len(substring)
    start = end = None
    running = 0
    for i, piece in enumerate(toks):
        running += len(piece)
        if start is None and running > char_start:
            start = i
        if running >= char_end:
            end = i + 1
            break
    return start, end


def split_template(template: str, what: str = "template") -> tuple[str, str]:
    """(text before the subject, text after it) of a template with exactly one bare "{}", as
    str.format will print them: other literal braces are written "{{" / "}}" and come back single.
    Any other replacement field ("{city}", "{0}", a lone brace) is a ValueError saying so."""
    if not isinstance(template, str):
        raise ValueError(f"a {what} must be a string with '{{}}' where the subject goes, got {template!r}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"{what} {template!r} is not a valid format string ({exc}): write a literal "
                         f"brace as '{{{{' or '}}}}'") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    others = ["{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
              for name, spec, conv in fields if (name, spec, conv) != ("", "", None)]
    if others:
        raise ValueError(f"{what} {template!r} has the field(s) {', '.join(others)} besides the subject's "
                         f"'{{}}': only '{{}}' may appear; write a literal brace as '{{{{' or '}}}}'")
    if len(fields) != 1:
        raise ValueError(f"{what} {template!r} must contain exactly one '{{}}' (found {len(fields)}): the "
                         "subject goes there, exactly once")
    i = next(i for i, p in enumerate(parts) if p[1] is not None)
    return "".join(p[0] for p in parts[:i + 1]), "".join(p[0] for p in parts[i + 1:])


def _split_template(template: str, word: str) -> tuple[str, str, str]:
    prefix, suffix = split_template(template)
    if prefix:
        if not prefix.endswith(" "):
            raise ValueError(f"the text before the subject must end with a space: {template!r}")
        prefix = prefix[:-1]
        word = " " + word.strip()
    return prefix, word, suffix


def _n_leading_specials(tokenizer) -> int:
    """Tokens the tokenizer puts before any text (a BOS), so piecewise counts can be shifted."""
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


def get_words_idxs_in_templates(tokenizer, context_templates: Sequence[str],
                                words: Sequence[str], subtoken: str = "last") -> list[list[int]]:
    """Token index of each word in its template (docs/editing.md, "Keys"): the prefix, word and suffix are
    tokenised separately; 'last' = len(prefix) + len(word) - 1, 'first' = len(prefix),
    'first_after_last' = len(prefix) + len(word) (the last subject token if nothing follows)."""
    if len(context_templates) != len(words):
        raise ValueError("one word per template is needed")
    shift = _n_leading_specials(tokenizer)
    out = []
    for template, word in zip(context_templates, words):
        if not word or not word.strip():
            raise ValueError("subject must be a non-empty string")
        prefix, word_, suffix = _split_template(template, word)
        n_pre = len(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0
        n_word = len(tokenizer.encode(word_, add_special_tokens=False))
        n_suf = len(tokenizer.encode(suffix, add_special_tokens=False)) if suffix else 0
        if subtoken == "last":
            idx = n_pre + n_word - 1
        elif subtoken == "first":
            idx = n_pre
        elif subtoken == "first_after_last":
            idx = n_pre + n_word - (1 if n_suf == 0 else 0)
        else:
            raise ValueError(f"unknown subtoken {subtoken!r}: 'last', 'first' or 'first_after_last'")
        out.append([shift + idx])
    return out


def subject_key_index(tokenizer, template: str, subject: str, fact_token: str = "subject_last") -> int:
    """Position of the key for an edit, by the reference's `fact_token` rule."""
    if fact_token == "last":
        return len(tokenizer.encode(template.format(subject))) - 1
    if not fact_token.startswith("subject_"):
        raise ValueError(f"unknown fact_token {fact_token!r}")
    return get_words_idxs_in_templates(tokenizer, [template], [subject],
                                       fact_token[len("subject_"):])[0][0]


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """The tokens of an answer string that continues a prompt, without special tokens; a leading
    space is added when missing (the answer follows a word, as ROME's targets do)."""
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("answer must be a non-empty string (the whole answer to score)")
    if not answer.startswith(" "):
        answer = " " + answer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenises to nothing")
    return [int(t) for t in ids]
