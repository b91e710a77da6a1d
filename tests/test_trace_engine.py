"""The fast tracing engine against the reference path.

fp32 scores agree to a relative 1e-5: the measured worst case on the tiny models is 2.5e-6
relative (6e-8 absolute; restoring a wrong state moves a score by 1e-3 or more), across every
family and engine mode."""
import pytest
import torch

from rome_fast.models.random_init import RANDOM_FAMILIES
from rome_fast.trace.api import calculate_hidden_flow, calculate_hidden_flow_fast
from rome_fast.trace.engine import FactInput, TraceEngine
from rome_fast.trace.noise import draw_noise
from rome_fast.tokens import find_token_range

# subject in the middle, at the start, and at the end (no token after it); different lengths
FACTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
         ("Miles Davis plays the", "Miles Davis"),
         ("The official language of Brazil", "Brazil")]
NOISE = 0.6     # tiny models' embeddings have std ~0.15: a strong corruption gives visible effects
WINDOW = 3      # 4-layer models: windows clip at both the first and the last layer
KIND_NAMES = {None: "hidden", "mlp": "mlp", "attn": "attn"}
SCORES = dict(rtol=1e-5, atol=1e-9)  # fast vs reference scores (probabilities >= 6e-4 here)
MODES = [("prefix", True), ("prefix", False), ("grid", False)]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return lambda family: tiny_model(family, seed=3)


@pytest.fixture(scope="module")
def reference(tiny):
    """reference(family): {(fact index, kind): the reference backend's dict}, computed once."""
    cache = {}

    def get(family):
        if family not in cache:
            mt = tiny(family)
            cache[family] = {(i, kind): calculate_hidden_flow(mt, prompt, subject, samples=4, noise=NOISE,
                                                              window=WINDOW, kind=kind, backend="reference")
                             for i, (prompt, subject) in enumerate(FACTS) for kind in (None, "mlp", "attn")}
        return cache[family]

    return get


def _facts(mt, samples=4):
    out = []
    for prompt, subject in FACTS:
        ids = mt.tokenizer.encode(prompt)
        b, e = find_token_range(mt.tokenizer, ids, subject)
        out.append(FactInput(ids, (b, e), draw_noise(samples, e - b, mt.adapter.hidden_size, NOISE)))
    return out


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_engine_equals_reference_all_kinds_many_facts(tiny, reference, family):
    mt = tiny(family)
    facts = _facts(mt)
    got = TraceEngine(mt, max_batch_tokens=400).trace(facts, kinds=("hidden", "mlp", "attn"),
                                                      window=WINDOW)
    spread = 0.0
    for i, res in enumerate(got):
        for kind in (None, "mlp", "attn"):
            ref = reference(family)[i, kind]
            assert mt.tokenizer.decode([res.answer]) == ref["answer"]
            assert res.high_score == pytest.approx(ref["high_score"], abs=1e-6)
            assert res.low_score == pytest.approx(ref["low_score"], abs=1e-6)
            scores = res.scores[KIND_NAMES[kind]]
            assert scores.shape == ref["scores"].shape
            torch.testing.assert_close(scores, ref["scores"].float(), **SCORES)
            spread = max(spread, float(ref["scores"].max() - ref["scores"].min()))
    assert spread > 1e-3, "the test model must show restoration effects for the test to mean anything"


@pytest.mark.parametrize("mode,reuse_kv", MODES)
def test_engine_modes_agree(tiny, reference, mode, reuse_kv):
    """Every mode, in other chunks (a smaller token budget), equals the default engine and the
    reference."""
    mt = tiny("llama")
    facts = _facts(mt)
    want = TraceEngine(mt).trace(facts, window=WINDOW)
    got = TraceEngine(mt, mode=mode, reuse_kv=reuse_kv, max_batch_tokens=300).trace(facts, window=WINDOW)
    for i, (w, g) in enumerate(zip(want, got)):
        for kind in ("hidden", "mlp", "attn"):
            torch.testing.assert_close(g.scores[kind], w.scores[kind], **SCORES)
        for kind in (None, "mlp", "attn"):
            torch.testing.assert_close(g.scores[KIND_NAMES[kind]], reference("llama")[i, kind]["scores"].float(),
                                       **SCORES)


def test_drop_in_dict_matches_reference(tiny):
    mt = tiny("gpt2")
    prompt, subject = FACTS[0]
    for kwargs in (dict(kind="mlp"), dict(token_range="subject_last"), dict(replace=True),
                   dict(uniform_noise=True, kind="attn")):
        ref = calculate_hidden_flow(mt, prompt, subject, samples=3, noise=NOISE, window=WINDOW,
                                    backend="reference", **kwargs)
        fast = calculate_hidden_flow(mt, prompt, subject, samples=3, noise=NOISE, window=WINDOW,
                                     backend="fast", **kwargs)
        assert set(fast) == set(ref)
        for key in ("answer", "subject_range", "window", "kind", "correct_prediction", "input_tokens"):
            assert fast[key] == ref[key], key
        assert torch.equal(torch.as_tensor(fast["input_ids"]), torch.as_tensor(ref["input_ids"]))
        assert fast["low_score"] == pytest.approx(ref["low_score"], abs=1e-6)
        torch.testing.assert_close(fast["scores"], ref["scores"].float(), **SCORES)


def test_wrong_prediction_returns_early(tiny):
    mt = tiny("gpt2")
    prompt, subject = FACTS[0]
    ref = calculate_hidden_flow(mt, prompt, subject, expect="certainly not this", backend="reference")
    fast = calculate_hidden_flow_fast(mt, prompt, subject, expect="certainly not this")
    assert fast["correct_prediction"] is False and ref["correct_prediction"] is False
    assert fast["answer"] == ref["answer"] and "scores" not in fast


def test_out_of_memory_splits_and_gives_same_results(tiny, monkeypatch):
    mt = tiny("llama")
    facts = _facts(mt)
    want = TraceEngine(mt).trace(facts, window=WINDOW)
    engine = TraceEngine(mt, max_batch_tokens=10_000)
    run_block = mt.adapter.run_block

    def flaky(layer, h, ctx):  # simulates a device that cannot hold more than 40 rows
        if h.shape[0] > 40:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return run_block(layer, h, ctx)

    monkeypatch.setattr(mt.adapter, "run_block", flaky)
    got = engine.trace(facts, window=WINDOW)
    monkeypatch.undo()
    assert engine.splits > 0
    for w, g in zip(want, got):
        for kind in ("hidden", "mlp", "attn"):
            torch.testing.assert_close(g.scores[kind], w.scores[kind], rtol=0, atol=1e-6)


@pytest.mark.parametrize("where, too_big", [("clean", lambda rows: 1 < rows < 4),   # 3 facts: 3 rows
                                             ("corrupted", lambda rows: rows > 4)])  # S = 4 rows a fact
def test_out_of_memory_in_the_clean_or_corrupted_pass_splits_the_facts(tiny, monkeypatch, where, too_big):
    mt = tiny("llama")
    facts = _facts(mt)
    want = TraceEngine(mt).trace(facts, window=WINDOW)
    engine = TraceEngine(mt)
    run_blocks = engine._run_blocks  # the full passes (clean, corrupted), not the cells' runs
    sizes = []

    def flaky(h, ctx, record):
        sizes.append(h.shape[0])
        if too_big(h.shape[0]):
            raise torch.OutOfMemoryError(f"simulated: the {where} pass does not fit")
        return run_blocks(h, ctx, record=record)

    monkeypatch.setattr(engine, "_run_blocks", flaky)
    got = engine.trace(facts, window=WINDOW)
    assert engine.splits >= 2 and any(too_big(n) for n in sizes)  # failed twice, then fact by fact
    for w, g in zip(want, got):
        assert (g.answer, g.high_score) == (w.answer, pytest.approx(w.high_score, rel=1e-5))
        assert g.low_score == pytest.approx(w.low_score, rel=1e-5)  # other padding: last bits differ
        for kind in ("hidden", "mlp", "attn"):
            torch.testing.assert_close(g.scores[kind], w.scores[kind], **SCORES)
    # one fact that does not fit is an error, not a silent result
    monkeypatch.setattr(engine, "_run_blocks", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        engine.trace(facts[:1], window=WINDOW)


def test_bad_input(tiny):
    mt = tiny("gpt2")
    engine = TraceEngine(mt)
    fact = _facts(mt)[0]
    with pytest.raises(ValueError, match="unknown kind"):
        engine.trace([fact], kinds=("foo",))
    with pytest.raises(ValueError, match="noise shape"):
        engine.trace([FactInput(fact.input_ids, fact.subject_range, torch.zeros(2, 1, 3))])
    with pytest.raises(ValueError, match="does not occur"):
        calculate_hidden_flow_fast(mt, "The Eiffel Tower", "Colosseum")
    with pytest.raises(ValueError, match="engine mode"):
        TraceEngine(mt, mode="magic")


def test_embedded_two_facts_hidden_equal_reference(embedded):
    """Two real facts at once on the engine vs the reference, hidden kind (the subject's last token
    and the prompt's last token, to keep the reference's one-pass-per-cell cost low)."""
    mt = embedded
    facts = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
             ("Miles Davis plays the", "Miles Davis")]
    inputs, refs = [], []
    for prompt, subject in facts:
        ids = mt.tokenizer.encode(prompt)
        b, e = find_token_range(mt.tokenizer, ids, subject)
        tokens = [e - 1, len(ids) - 1]
        inputs.append(FactInput(ids, (b, e), draw_noise(10, e - b, mt.adapter.hidden_size, 0.13), tokens))
        refs.append(calculate_hidden_flow(mt, prompt, subject, noise=0.13, token_range=tokens,
                                          backend="reference"))
    got = TraceEngine(mt).trace(inputs, kinds=("hidden",))
    for res, ref in zip(got, refs):
        assert mt.tokenizer.decode([res.answer]) == ref["answer"]
        assert res.low_score == pytest.approx(ref["low_score"], abs=1e-5)
        # measured: 1.0e-5 relative, 6e-6 absolute (the fused blocks and sdpa round differently)
        torch.testing.assert_close(res.scores["hidden"], ref["scores"].float(), rtol=5e-5, atol=1e-8)
    assert got[0].scores["hidden"].max() > 0.5  # Paris comes back when the subject is restored
