"""Evaluation metrics, generation metrics and data loaders against hand computations."""
import json
import math

import numpy as np
import pytest
import torch

from rome_fast.eval import datasets as D
from rome_fast.eval import generation as G
from rome_fast.eval import metrics as M


@pytest.fixture(scope="module")
def tiny():
    """A tiny random GPT-2 and its BPE; one thread, since tiny forwards only lose to threading."""
    from rome_fast.models.random_init import random_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = random_model("gpt2", seed=3)
    yield model, tok
    torch.set_num_threads(threads)


def _manual_nll(model, tok, prefix, target):
    """One unpadded sequence per target, one log-softmax per target token."""
    p = tok(prefix)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + t])).logits[0]
    total = 0.0
    for j, tid in enumerate(t):
        total -= torch.log_softmax(logits[len(p) + j - 1], -1)[tid].item()
    return total / len(t)


PAIRS = [("The Eiffel Tower is located in", "Paris"),
         ("Miles Davis plays the", "trumpet and the piano"),
         ("Berlin", "Germany"),
         ("The official language of Brazil is", "Portuguese")]


def test_target_nll_matches_manual(tiny):
    model, tok = tiny
    got = M.target_nll(model, tok, PAIRS, batch_size=3)  # two batches, right padding in both
    want = [_manual_nll(model, tok, p, t) for p, t in PAIRS]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len({round(x, 3) for x in got}) == len(got)  # distinct values: a mix-up would show


def test_target_tokens_are_those_of_space_target(tiny):
    _, tok = tiny
    assert M.target_ids(tok, "Paris") == tok(" Paris")["input_ids"]
    with pytest.raises(ValueError, match="empty prompt"):
        M.prefix_ids(tok, "")


def _cf_record(**kw):
    rec = dict(case_id=7, prompt="The Eiffel Tower is located in", subject="The Eiffel Tower",
               target_new="Rome", ground_truth="Paris", rephrase_prompt="Where is The Eiffel Tower? In",
               locality_prompt="The Louvre is in", locality_ground_truth="France")
    rec.update(kw)
    return rec


def test_counterfact_probs_layout(tiny):
    model, tok = tiny
    r = D.counterfact_record(_cf_record())
    out = M.counterfact_probs(model, tok, r)
    assert set(out) == {"rewrite_prompts_probs", "paraphrase_prompts_probs",
                        "neighborhood_prompts_probs", "attribute_prompts_probs"}
    nb = out["neighborhood_prompts_probs"][0]
    # the neighbourhood's true target is its own answer (France), the new one the edit's (Rome)
    assert nb["target_true"] == pytest.approx(_manual_nll(model, tok, "The Louvre is in", "France"), rel=1e-5)
    assert nb["target_new"] == pytest.approx(_manual_nll(model, tok, "The Louvre is in", "Rome"), rel=1e-5)
    rw = out["rewrite_prompts_probs"][0]
    assert rw["target_true"] == pytest.approx(_manual_nll(model, tok, r.rewrite_prompt, "Paris"), rel=1e-5)
    assert out["attribute_prompts_probs"] == []


def test_case_scores_by_hand():
    m = {"rewrite_prompts_probs": [{"target_new": 1.0, "target_true": 2.0}],
         "paraphrase_prompts_probs": [{"target_new": 1.0, "target_true": 3.0},
                                      {"target_new": 2.0, "target_true": 2.0}],  # a tie fails
         "neighborhood_prompts_probs": [{"target_new": 0.5, "target_true": 0.25},
                                        {"target_new": 3.0, "target_true": 1.0},
                                        {"target_new": 1.0, "target_true": 2.0}],
         "ngram_entropy": 6.0}
    s = M.counterfact_case_scores(m)
    assert s["ES"] == 1.0 and s["EM"] == pytest.approx(math.exp(-1) - math.exp(-2))
    assert s["PS"] == 0.5 and s["PM"] == pytest.approx((math.exp(-1) - math.exp(-3) + 0) / 2)
    assert s["NS"] == pytest.approx(2 / 3)  # the last prompt has P(new) > P(true)
    nm = ((math.exp(-0.25) - math.exp(-0.5)) + (math.exp(-1) - math.exp(-3)) + (math.exp(-2) - math.exp(-1))) / 3
    assert s["NM"] == pytest.approx(nm)
    assert s["GE"] == 6.0


def test_aggregate_and_score_by_hand():
    recs = [{"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.2},
            {"ES": 1.0, "PS": 1.0, "NS": 0.0, "EM": 0.4},
            {"ES": 0.0, "PS": 0.5, "NS": 0.5, "EM": 0.0},
            {"ES": 1.0, "PS": 0.0, "NS": 0.5, "EM": 0.6}]
    a = M.aggregate(recs)
    assert a["ES"]["mean"] == pytest.approx(75.0)
    es = np.array([1, 1, 0, 1.0])
    assert a["ES"]["std"] == pytest.approx(100 * math.sqrt(np.mean((es - 0.75) ** 2)))
    assert a["ES"]["ci95"] == pytest.approx(1.96 * a["ES"]["std"] / 2)
    assert a["PS"]["mean"] == pytest.approx(50.0) and a["NS"]["mean"] == pytest.approx(50.0)
    assert a["S"] == pytest.approx(3 / (1 / 75 + 1 / 50 + 1 / 50))
    assert a["EM"]["mean"] == pytest.approx(30.0)
    assert "GE" not in a
    assert M.harmonic_mean([50.0, 0.0, 90.0]) == 0.0
    assert math.isnan(M.harmonic_mean([]))


def test_zsre_case_scores():
    s = M.zsre_case_scores({"rewrite_prompts_correct": [True, False, True, True],
                            "paraphrase_prompts_correct": [False],
                            "neighborhood_prompts_correct": [True, True]})
    assert s == {"Efficacy": 0.75, "Paraphrase": 0.0, "Specificity": 1.0}
    a = M.aggregate([s, {"Efficacy": 0.25, "Paraphrase": 1.0, "Specificity": 0.0}], M.ZSRE_KEYS)
    assert a["Efficacy"]["mean"] == pytest.approx(50.0) and "S" not in a


def test_token_accuracy_matches_teacher_forced_loop(tiny):
    model, tok = tiny
    # a target the model gets right: its own greedy token after the prefix (when it starts a word)
    def greedy_word(prefix):
        with torch.no_grad():
            g = int(model(input_ids=torch.tensor([tok(prefix)["input_ids"]])).logits[0, -1].argmax())
        piece = tok.decode([g])
        ok = piece.startswith(" ") and tok(piece, add_special_tokens=False)["input_ids"] == [g]
        return piece[1:] if ok else None

    from rome_fast.models.random_init import _CORPUS
    words = _CORPUS.split()
    candidates = [" ".join(words[:i]) for i in range(1, 80)]
    prefix, word = next((p, w) for p in candidates if (w := greedy_word(p)))
    pairs = PAIRS + [(prefix, word + " Italy")]
    got = M.token_accuracy(model, tok, pairs, batch_size=2)
    for (p, t), row in zip(pairs, got):
        pid, tid = tok(p)["input_ids"], tok(" " + t, add_special_tokens=False)["input_ids"]
        want = []
        for j in range(len(tid)):  # one forward per target token, as the reference
            with torch.no_grad():
                lg = model(input_ids=torch.tensor([pid + tid[:j]])).logits[0, -1]
            want.append(int(lg.argmax()) == tid[j])
        assert row == want
    assert got[-1][0] is True


def test_zsre_correct_layout(tiny):
    model, tok = tiny
    r = D.zsre_record({"subject": "Toyota", "src": "Where is Toyota headquartered?",
                       "rephrase": "Toyota's headquarters are in which country?", "answers": ["Japan"],
                       "alt": "Spain", "loc": "nq question: who founded apple", "loc_ans": "Steve Jobs"}, 0)
    out = M.zsre_correct(model, tok, r)
    n_new = len(M.target_ids(tok, "Japan"))
    assert len(out["rewrite_prompts_correct"]) == n_new == len(out["paraphrase_prompts_correct"])
    assert len(out["neighborhood_prompts_correct"]) == len(M.target_ids(tok, "Steve Jobs"))


# ---------------------------------------------------------------------------------------------
# Generation metrics

def test_word_tokenize_like_nltk():
    assert G.word_tokenize("Hello, world. This is Mr. Smith's house, isn't it? Yes!") == [
        "Hello", ",", "world", ".", "This", "is", "Mr.", "Smith", "'s", "house", ",", "is", "n't",
        "it", "?", "Yes", "!"]
    assert G.word_tokenize('He said "no" (twice) for $1,000.50... I cannot go.') == [
        "He", "said", "``", "no", "''", "(", "twice", ")", "for", "$", "1,000.50", "...", "I",
        "can", "not", "go", "."]
    assert G.word_tokenize("The U.S. Army left. Then") == ["The", "U.S.", "Army", "left", ".", "Then"]


def _h(probs):
    return -sum(p * math.log2(p) for p in probs)


def test_ngram_entropy_by_hand():
    # words: a b a b -> bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2, 1/2)
    h2, h3 = _h([2 / 3, 1 / 3]), 1.0
    assert G.ngram_entropy_of_text("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # words: the cat sat . the cat sat . -> 7 bigrams, 4 distinct: (the,cat)x2 (cat,sat)x2
    # (sat,.)x2 (.,the)x1; 6 trigrams, 4 distinct: 2, 2, 1, 1
    h2 = _h([2 / 7, 2 / 7, 2 / 7, 1 / 7])
    h3 = _h([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    ge = G.ngram_entropy_of_text("the cat sat. the cat sat.")
    assert ge == pytest.approx(h2 / 3 + 2 * h3 / 3)
    assert G.ngram_entropy_of_text("one") == 0.0  # too short for any n-gram
    assert G.n_gram_entropy(["a b a b", "the cat sat. the cat sat."]) == pytest.approx(
        ((2 / 3 * _h([2 / 3, 1 / 3]) + 4 / 3) / 2 + ge) / 2)


def test_tfidf_cosine_by_hand(tmp_path):
    vocab = {"cat": 0, "dog": 1, "sat": 2}
    idf = np.array([1.0, 2.0, 1.5])
    np.save(tmp_path / "idf.npy", idf)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    v = G.TfIdf.from_files(tmp_path / "idf.npy", tmp_path / "vocab.json")
    # a: cat x2 (case-folded), sat x1, "the" out of vocabulary -> (2, 0, 1.5)
    # b: dog x1, sat x1, "a" is one character (not a token) -> (0, 2, 1.5)
    a, b = "The cat sat, the CAT!", "dog sat a"
    want = (1.5 * 1.5) / (math.sqrt(2 ** 2 + 1.5 ** 2) * math.sqrt(2 ** 2 + 1.5 ** 2))
    assert v.similarity(a, b) == pytest.approx(want)
    assert v.similarity(a, a) == pytest.approx(1.0)
    assert v.similarity(a, "nothing known here") == 0.0
    with pytest.raises(ValueError, match="out of range"):
        G.TfIdf(np.ones(2), vocab)


def test_generate_greedy_matches_uncached_loop(tiny):
    """top_k=1 makes sampling greedy: the KV-cached, left-padded batch must equal a full forward
    per step on each prompt alone (the reference's one-column mask would not)."""
    model, tok = tiny
    prompts = ["The Eiffel Tower is located in the city of", "Paris"]
    got = G.generate(model, tok, prompts, max_out_len=16, top_k=1)
    for p, text in zip(prompts, got):
        ids = tok(p)["input_ids"]
        while len(ids) < 16:
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == G.unicodedata.normalize("NFKD", tok.decode(ids)).replace("\n\n", " ")


def test_generate_seeded(tiny):
    model, tok = tiny
    a = G.generate(model, tok, ["Toyota is", "The Nile"], max_out_len=12, seed=5)
    assert a == G.generate(model, tok, ["Toyota is", "The Nile"], max_out_len=12, seed=5)
    assert all(len(tok(t)["input_ids"]) >= 8 for t in a)
    assert G.generate(model, tok, ["Toyota is"], max_out_len=2) == ["Toyota is"]  # prompt too long


def test_generate_many_equals_each_set_alone(tiny):
    """Sets of different sizes and prompt lengths in one batch, each with its own seed: every
    set's texts are those of `generate` on it alone (an empty set included)."""
    model, tok = tiny
    sets = [["Toyota is", "The Nile flows through the desert of"], [], ["Berlin"],
            ["A much longer prompt about the history of the printing press in Europe", "Rome", "Paris is"]]
    seeds = [3, 4, 5, 6]
    got = G.generate_many(model, tok, sets, seeds, max_out_len=20, n_gen_per_prompt=2)
    assert got == [G.generate(model, tok, s, max_out_len=20, seed=k, n_gen_per_prompt=2) for s, k in zip(sets, seeds)]
    assert [len(g) for g in got] == [4, 0, 2, 6]
    with pytest.raises(ValueError, match="2 prompt sets but 1 seeds"):
        G.generate_many(model, tok, sets[:2], [0])


def test_many_records_measured_as_each_alone(tiny):
    """`case_metrics_many` (records batched together, generations per record seed) = the
    one-record `case_metrics` of each: NLLs within rounding, flags and texts exactly; zsRE and
    CounterFact records mixed."""
    from rome_fast.eval.cases import case_metrics, case_metrics_many

    class MT:
        model, tokenizer = tiny

    cf = [D.counterfact_record(_cf_record(case_id=i, subject=s, prompt=f"{s} is located in",
                                          rephrase_prompt=f"Where is {s}? It is in"))
          for i, s in enumerate(["The Eiffel Tower", "Big Ben", "The Colosseum of ancient Rome"])]
    zs = D.zsre_record({"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
                        "rephrase": "What university did Watts Humphrey go to?", "alt": "University of Michigan",
                        "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss",
                        "loc_ans": "Andrew Garfield"}, case_id=7)
    records, skip = [cf[0], zs, cf[1], cf[2]], [False, False, True, False]
    many = case_metrics_many(MT, records, skip, seed=2, accuracy=True)
    for r, s, got in zip(records, skip, many):
        alone = case_metrics(MT, r, skip_generation=s, seed=2, accuracy=True)
        assert got.keys() == alone.keys()
        for k, v in alone.items():
            if k.endswith("_probs"):
                assert [x[t] for x in got[k] for t in ("target_new", "target_true")] == pytest.approx(
                    [x[t] for x in v for t in ("target_new", "target_true")], rel=1e-5)
            else:
                assert got[k] == v, k
    assert "text" in many[0] and "text" not in many[2] and "rewrite_prompts_correct" in many[1]


def test_perplexity_by_hand(tiny):
    model, tok = tiny
    text = "Mount Everest is in Nepal."
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    total = sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert G.perplexity(model, tok, text) == pytest.approx(math.exp(-total / len(ids)), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Loaders

def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_load_compact_counterfact(tmp_path):
    recs = D.load_counterfact(_write(tmp_path / "cf.json", [_cf_record(), _cf_record(case_id=9)]))
    r = recs[0]
    assert (r.case_id, r.dataset, r.subject, r.target_new, r.target_true) == (7, "counterfact", "The Eiffel Tower", "Rome", "Paris")
    assert r.requested_rewrite["prompt"] == "{} is located in"
    assert r.rewrite_prompt == "The Eiffel Tower is located in"
    assert r.paraphrase_prompts == ["Where is The Eiffel Tower? In"]
    assert r.neighborhood_prompts == [{"prompt": "The Louvre is in", "target": "France"}]
    assert r.request() == {"prompt": "{} is located in", "subject": "The Eiffel Tower",
                           "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}
    assert len(D.load_counterfact(tmp_path / "cf.json", limit=1)) == 1


def test_load_full_counterfact(tmp_path):
    full = {"case_id": 0, "pararel_idx": 2796,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                  "target_new": {"str": "English", "id": "Q1860"},
                                  "target_true": {"str": "French", "id": "Q150"},
                                  "subject": "Danielle Darrieux"},
            "paraphrase_prompts": ["x. Danielle Darrieux, a native", "y. Danielle Darrieux spoke"],
            "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin spoke"],
            "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
            "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
    # both formats in one file
    recs = D.load_counterfact(_write(tmp_path / "cf.json", [full, _cf_record()]))
    r = recs[0]
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert r.requested_rewrite["relation_id"] == "P103" and r.requested_rewrite["target_new"]["id"] == "Q1860"
    assert r.neighborhood_prompts[1] == {"prompt": "Jean Gabin spoke", "target": "French"}
    assert len(r.paraphrase_prompts) == 2 and r.attribute_prompts and r.generation_prompts
    assert recs[1].case_id == 7


def test_load_zsre(tmp_path):
    rec = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
           "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
           "answers": ["uniform"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
           "cond": "uniform >> unmanned aircraft || ..."}
    r = D.load_zsre(_write(tmp_path / "z.json", [rec, rec]))[1]
    assert r.case_id == 1 and r.dataset == "zsre"
    assert r.requested_rewrite == {"prompt": "What is the product made by {}?", "subject": "UniFirst",
                                   "target_new": {"str": "uniform"}, "target_true": {"str": "<|endoftext|>"}}
    assert r.paraphrase_prompts == ["What will be the product of UniFirst?"]
    assert r.neighborhood_prompts == [{"prompt": "nq question: who wrote hamlet?", "target": "Shakespeare"}]
    assert D.zsre_record(rec, 0, target="alt").target_new == "unmanned aircraft"


@pytest.mark.parametrize("change, match", [
    (lambda r: r.pop("ground_truth"), "missing key"),
    (lambda r: r.update(subject="Nobody"), "does not occur"),
    (lambda r: r.update(target_new=""), "non-empty string"),
    (lambda r: r.update(case_id="7"), "case_id"),
    (lambda r: r.update(prompt="The {Eiffel} Tower is located in"), "subject|braces"),
])
def test_malformed_counterfact(tmp_path, change, match):
    rec = _cf_record()
    change(rec)
    with pytest.raises(ValueError, match=match):
        D.load_counterfact(_write(tmp_path / "bad.json", [rec]))


def test_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="duplicate case_id"):
        D.load_counterfact(_write(tmp_path / "dup.json", [_cf_record(), _cf_record()]))
    with pytest.raises(ValueError, match="JSON list"):
        D.load_counterfact(_write(tmp_path / "obj.json", {"a": 1}))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        D.load_zsre(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="rome.baulab.info"):
        D.load_counterfact(tmp_path / "counterfact.json")
    full = {"case_id": 0, "requested_rewrite": {"prompt": "no template", "subject": "S",
            "target_new": {"str": "a"}, "target_true": {"str": "b"}},
            "paraphrase_prompts": [], "neighborhood_prompts": []}
    with pytest.raises(ValueError, match="exactly once"):
        D.load_counterfact(_write(tmp_path / "f.json", [full]))
    z = {"subject": "X", "src": "Where is X?", "rephrase": "X?", "answers": [], "loc": "nq question: q",
         "loc_ans": "a"}
    with pytest.raises(ValueError, match="answers"):
        D.load_zsre(_write(tmp_path / "z.json", [z]))
    with pytest.raises(ValueError, match="nq question"):
        D.load_zsre(_write(tmp_path / "z2.json", [dict(z, answers=["a"], loc="who?")]))


def test_download_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown data file"):
        D.download("nope.json", tmp_path)
    assert D.DATA_URLS["counterfact.json"] == "https://rome.baulab.info/data/dsets/counterfact.json"


def test_shared_data_files(data_dir):
    cf = D.load_counterfact(data_dir / "counterfact-edit.json")
    assert len(cf) == 10000 and cf[0].rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert cf[0].requested_rewrite["prompt"] == "The mother tongue of {} is"
    z = D.load_zsre(data_dir / "zsre_mend_train-1k.json")
    assert len(z) == 1000 and all("{}" in r.requested_rewrite["prompt"] for r in z)
    assert z[0].target_new == "uniform"
    assert len(D.load_known_facts(data_dir / "known_1000.json")) == 1209


@pytest.mark.cuda
def test_metrics_and_generation_on_cuda(tiny):
    """Device-agnostic: the same numbers on the GPU as on the CPU (greedy text identical)."""
    import copy
    model, tok = tiny
    gpu = copy.deepcopy(model).cuda()
    assert M.target_nll(gpu, tok, PAIRS) == pytest.approx(M.target_nll(model, tok, PAIRS), rel=1e-4)
    assert M.token_accuracy(gpu, tok, PAIRS) == M.token_accuracy(model, tok, PAIRS)
    prompts = ["The Nile", "Apple was founded by"]
    assert G.generate(gpu, tok, prompts, max_out_len=12, top_k=1) == G.generate(model, tok, prompts, max_out_len=12, top_k=1)
