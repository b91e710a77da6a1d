"""Locating subjects: the reference's decode-concatenate-match rule and its subject_last key."""
import pytest

import rome_fast as rf
from rome_fast.models.random_init import tiny_tokenizer


def _pieces(tok, prompt, subject):
    ids = tok.encode(prompt)
    s, e = rf.find_token_range(tok, ids, subject)
    return "".join(tok.decode([i]) for i in ids[s:e]), s, e, len(ids)


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def tok(request):
    if request.param == "tiny":
        return tiny_tokenizer()
    return request.getfixturevalue("embedded").tokenizer


def test_subject_at_start(tok):
    text, s, e, _ = _pieces(tok, "Danielle Darrieux was a French actress", "Danielle Darrieux")
    assert s == 0 and text == "Danielle Darrieux"


def test_subject_in_middle(tok):
    text, s, e, _ = _pieces(tok, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    assert s >= 1 and text.strip().endswith("Eiffel Tower") and "Eiffel" in text


def test_subject_repeated_takes_first(tok):
    prompt = "Paris is big. Paris is old."
    ids = tok.encode(prompt)
    s, e = rf.find_token_range(tok, ids, "Paris")
    assert s == 0
    assert "".join(tok.decode([i]) for i in ids[:e]) == "Paris"


def test_subject_inside_a_token_covers_that_token(tok):
    # 'iffel' starts inside a token in both tokenizers: the range must still cover it
    text, s, e, _ = _pieces(tok, "The Eiffel Tower is tall", "iffel")
    assert "iffel" in text


def test_subject_absent_or_empty(tok):
    ids = tok.encode("The Eiffel Tower is tall")
    with pytest.raises(ValueError, match="does not occur"):
        rf.find_token_range(tok, ids, "Colosseum")
    with pytest.raises(ValueError, match="non-empty"):
        rf.find_token_range(tok, ids, "")


def test_subject_last_key_index(tok):
    prompt = "{} is located in the city of"
    idx = rf.subject_key_index(tok, prompt, "Eiffel Tower")
    ids = tok.encode(prompt.format("Eiffel Tower"))
    s, e = rf.find_token_range(tok, ids, "Eiffel Tower")
    assert idx == e - 1
    # a prefixed template: the prefix must end in a space and is tokenised on its own
    idx2 = rf.subject_key_index(tok, "Hello there. " + prompt, "Eiffel Tower")
    ids2 = tok.encode(("Hello there. " + prompt).format("Eiffel Tower"))
    s2, e2 = rf.find_token_range(tok, ids2, "Eiffel Tower")
    assert idx2 == e2 - 1
    assert rf.subject_key_index(tok, prompt, "Eiffel Tower", "subject_first") == s
    with pytest.raises(ValueError, match="exactly one"):
        rf.subject_key_index(tok, "no slot here", "x")


def test_make_inputs_left_pads():
    tok = tiny_tokenizer()
    inp = rf.make_inputs(tok, ["Paris", "The Eiffel Tower is"])
    assert inp["input_ids"].shape == inp["attention_mask"].shape
    assert inp["attention_mask"][0, 0] == 0 and inp["attention_mask"][1].all()
    with pytest.raises(ValueError, match="empty prompt"):
        rf.make_inputs(tok, [""])


def test_tensor_inputs_as_reference_scripts_pass_them(tok):
    import torch
    ids = tok.encode("The Eiffel Tower is tall")
    want = rf.find_token_range(tok, ids, "Eiffel Tower")
    assert rf.find_token_range(tok, torch.tensor(ids), "Eiffel Tower") == want
    assert rf.find_token_range(tok, torch.tensor([ids])[0], "Eiffel Tower") == want
    assert rf.decode_tokens(tok, torch.tensor([ids, ids]))[1] == rf.decode_tokens(tok, ids)
