"""ROME on the embedded SmolLM2-135M with statistics from WikiText-2: the Eiffel Tower moves to
Rome, a paraphrase follows, an unrelated fact stays, and the weights come back bit for bit."""
import os

import pytest
import torch

from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, get_context_templates, restore_weights
from rome_fast.edit.demo import target_probability, top_token

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASE = "The Eiffel Tower, a famous landmark, can be found in the city of"
UNRELATED = ["The Colosseum is located in the city of", "The capital of France is",
             "Michael Jordan plays the sport of"]
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": {"str": " Rome"}}
N_ARTICLES = 8  # ~16k tokens of WikiText (10x the key width): C is well conditioned, quick to collect


@pytest.fixture(scope="module")
def threads():
    # OpenMP threads spin when other processes share the two cores; one thread is then far faster
    n = torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def edited(embedded, data_dir, tmp_path_factory, threads):
    """One edit with the preset's layer; probes before and after; weights restored at the end."""
    mt = embedded
    model, tok = mt.model, mt.tokenizer
    hp = ROMEHyperParams.from_name(mt.name)
    hp.mom2_n_samples = N_ARTICLES
    probes = [PROMPT, PARAPHRASE] + UNRELATED
    before = {p: (top_token(model, tok, p), target_probability(model, tok, p, " Rome")) for p in probes}
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    templates = get_context_templates(model, tok, hp.context_template_length_params, seed=0)
    _, orig = apply_rome_to_model(model, tok, [REQUEST], hp, return_orig_weights=True,
                                  context_templates=templates, stats_dir=tmp_path_factory.mktemp("stats"),
                                  corpus=data_dir / "wikitext-2-raw-test.txt", progress=False)
    try:
        after = {p: (top_token(model, tok, p), target_probability(model, tok, p, " Rome")) for p in probes}
        changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n]))
    finally:
        restore_weights(model, orig)
    restored = all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    return dict(before=before, after=after, changed=changed, orig=orig, hp=hp, restored=restored)


def test_the_fact_is_rewritten(edited):
    assert edited["before"][PROMPT][0] == " Paris"
    assert edited["after"][PROMPT][0] == " Rome"
    assert edited["after"][PROMPT][1] > 0.5


def test_a_paraphrase_follows(edited):
    p0, p1 = edited["before"][PARAPHRASE][1], edited["after"][PARAPHRASE][1]
    assert p1 > 5 * p0 and p1 > 0.2


def test_unrelated_facts_stay(edited):
    for p in UNRELATED:
        assert edited["after"][p][0] == edited["before"][p][0], p


def test_only_the_rewrite_weight_changed_and_restore_is_exact(edited):
    layer = edited["hp"].layers[0]
    assert edited["changed"] == [f"model.layers.{layer}.mlp.down_proj.weight"] == list(edited["orig"])
    assert edited["restored"]
