"""Tracing through rome_fast.compat.experiments.causal_trace behaves as the reference's module:
the result dict's types, a mispredicted fact, guess_subject, figures shown or written, the 'm'
and 'tN' noise helpers; and the two options beyond the reference on both backends: severed paths
(trace_with_repatch, the paper's Fig. 3) and whole-answer scoring."""
import numpy as np
import pytest
import torch

from rome_fast.compat.experiments import causal_trace as ct
from rome_fast.tokens import answer_token_ids

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"
NOISE = 0.6   # tiny models' embeddings have std ~0.15: a strong corruption
SCORES = dict(rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def mt(tiny_model):
    return tiny_model("gpt2", seed=3)


def test_result_dict_types_as_the_reference(mt):
    r = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE)
    assert torch.is_tensor(r["high_score"]) and r["high_score"].dim() == 0
    assert isinstance(r["low_score"], float) and r["correct_prediction"] is True
    assert r["scores"].shape == (len(r["input_tokens"]), mt.num_layers)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_mispredicted_fact_returns_only_correct_prediction(mt, backend):
    r = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, expect="no such token",
                                 backend=backend)
    assert r == {"correct_prediction": False}


@pytest.mark.parametrize("prompt,subject", [
    ("Audible.com is owned by", "Audible.com"),              # the first word runs to whitespace
    ("Toko Yasuda, the", "Toko Yasuda"),                     # later words stop at punctuation
    ("Which company made Windows Phone", "Windows Phone"),   # "Which " is skipped
    ("Who is the CEO of Apple Inc.?", "CEO"),
    ("What sport does Shaquille O'Neal play?", "Shaquille O'"),  # later words: [A-Z][a-z']* only
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux's"),
    ("In 1990, IBM Research", "In"),
    ("Whose idea was it? Tim Cook's", "Whose"),              # only "Wh…" followed by a space is skipped
])
def test_guess_subject_as_the_reference(prompt, subject):
    assert ct.guess_subject(prompt) == subject


def test_plot_shown_without_savepdf_and_written_exactly_with_it(mt, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append([plt.figure(n) for n in plt.get_fignums()]))
    r = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, kind="mlp", window=3)
    assert ct.plot_trace_heatmap(r) is None
    assert len(shown) == 1 and shown[0], "plt.show() saw no figure"
    fig = shown[0][-1]
    assert fig.axes[0].get_title() == "Impact of restoring MLP after corrupted input"
    plt.close("all")
    out = tmp_path / "sub" / "case.pdf"
    ct.plot_trace_heatmap(r, savepdf=str(out))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["case.pdf"]
    assert out.read_bytes()[:4] == b"%PDF"


def test_noise_helpers_m_and_t(mt):
    mean, cov = ct.get_embedding_cov(mt)
    d = mt.adapter.hidden_size
    assert mean.shape == (d,) and cov.shape == (d, d) and cov.dtype == torch.float64
    gen = ct.make_generator_transform(mean, cov)
    z = torch.from_numpy(np.random.RandomState(0).randn(20000, d))
    x = gen(z)
    assert torch.allclose(x.mean(0), mean, atol=0.05 * cov.diag().sqrt().max())
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05 * cov.diag().max())
    ident = ct.make_generator_transform(mean=mean)
    assert torch.allclose(ident(z[:3]), z[:3] + mean)
    # the rules run end to end: a fitted Gaussian and a Student-t as the tracers' noise
    for noise in (ct.collect_embedding_gaussian(mt), ct.collect_embedding_tdist(mt, 3)):
        fast = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=noise)
        ref = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=noise, backend="reference")
        torch.testing.assert_close(fast["scores"], ref["scores"], **SCORES)
        assert fast["low_score"] < float(fast["high_score"])


# ---- severed paths -------------------------------------------------------------------------------

def test_trace_with_repatch_without_unpatching_is_trace_with_patch(mt):
    inp = ct.make_inputs(mt.tokenizer, [PROMPT] * 4)
    answer = ct.predict_from_input(mt.model, inp)[0][0]
    b, e = ct.find_token_range(mt.tokenizer, inp["input_ids"][0], SUBJECT)
    states = [(e - 1, ct.layername(mt.model, 1))]
    a = ct.trace_with_repatch(mt.model, inp, states, [], answer, (b, e), noise=NOISE)
    p = ct.trace_with_patch(mt.model, inp, states, answer, (b, e), noise=NOISE)
    assert torch.equal(a, p)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_flow_fast_equals_reference(tiny_model, family, sever):
    mt = tiny_model(family, seed=3)
    ref = ct.calculate_severed_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, token_range=None,
                                    sever=sever, backend="reference")
    fast = ct.calculate_severed_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, token_range=None,
                                     sever=sever, backend="fast")
    torch.testing.assert_close(fast["scores"], ref["scores"], **SCORES)
    assert fast["low_score"] == pytest.approx(ref["low_score"], rel=1e-5)
    ordinary = ct.calculate_severed_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, token_range=None,
                                         backend="reference")
    b, e = ref["subject_range"]
    assert not torch.allclose(ref["scores"][b:e], ordinary["scores"][b:e]), "severing changed nothing"


def test_severed_comparison_figure(mt, tmp_path):
    results = {k: ct.calculate_severed_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, sever=k)
               for k in (None, "attn", "mlp")}
    assert all(r["scores"].shape == (1, mt.num_layers) for r in results.values())
    paths = ct.plot_severed_comparison(results, savepdf=tmp_path / "fig3")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="sever must be"):
        ct.calculate_severed_flow(mt, PROMPT, SUBJECT, sever="hidden")


# ---- whole answers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", [None, "mlp"])
def test_whole_answer_fast_equals_reference(tiny_model, family, kind):
    mt = tiny_model(family, seed=3)
    ref = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, window=3, kind=kind,
                                   answer="Paris, France", backend="reference")
    fast = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, window=3, kind=kind,
                                    answer="Paris, France", backend="fast")
    torch.testing.assert_close(fast["scores"], ref["scores"], **SCORES)
    assert fast["low_score"] == pytest.approx(ref["low_score"], rel=1e-5)
    assert float(fast["high_score"]) == pytest.approx(float(ref["high_score"]), rel=1e-5)
    assert fast["answer"] == ref["answer"] == " Paris, France"
    assert fast["scores"].shape[0] == len(mt.tokenizer.encode(PROMPT))  # rows: the prompt's tokens


def test_whole_answer_is_the_product_of_teacher_forced_probabilities(mt):
    ids = mt.tokenizer.encode(PROMPT)
    ans = answer_token_ids(mt.tokenizer, "Paris, France")
    assert len(ans) > 1
    with torch.no_grad():
        logits = mt.model(torch.tensor([ids + ans[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    expected = float(torch.exp(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(ans))))
    r = ct.calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, answer="Paris, France")
    assert float(r["high_score"]) == pytest.approx(expected, rel=1e-5)


def test_one_token_answer_equal_to_the_top1_gives_the_reference_scores(mt):
    from rome_fast.trace.api import make_fact_input
    from rome_fast.trace.engine import TraceEngine
    engine = TraceEngine(mt)
    fact = make_fact_input(mt, PROMPT, SUBJECT, 3, NOISE)
    default = engine.trace([fact], kinds=("hidden",))[0]
    fact.answer = default.answer  # the clean top-1 given as a one-token answer
    same = engine.trace([fact], kinds=("hidden",))[0]
    torch.testing.assert_close(same.scores["hidden"], default.scores["hidden"], rtol=0, atol=0)
    assert same.high_score == default.high_score and same.greedy


def test_trace_facts_whole_answer_on_both_backends(tmp_path, one_thread):
    import json

    from rome_fast.cli import main
    facts = [dict(known_id=i, subject=s, prompt=p, attribute=a, relation_id="P0")
             for i, (p, s, a) in enumerate([(PROMPT, SUBJECT, "Paris, France"),
                                            ("Miles Davis plays the", "Miles Davis", "jazz trumpet")])]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    out = {}
    for backend in ("fast", "reference"):
        out[backend] = tmp_path / backend
        assert main(["trace", "--facts", str(path), "--whole-answer", "--kind", "hidden", "--model", "tiny:gpt2",
                     "--samples", "2", "--no-progress", "--backend", backend, "--out", str(out[backend])]) == 0
        assert json.loads((out[backend] / "run.json").read_text())["whole_answer"] is True
    for i, fact in enumerate(facts):
        with np.load(out["fast"] / "cases" / f"knowledge_{i}.npz") as f, \
                np.load(out["reference"] / "cases" / f"knowledge_{i}.npz") as r:
            assert bool(f["correct_prediction"]) and str(f["answer"]) == str(r["answer"]) == " " + fact["attribute"]
            np.testing.assert_allclose(f["scores"], r["scores"], rtol=1e-5, atol=1e-8)
    assert main(["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--whole-answer", "--model", "tiny:gpt2",
                 "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("mode,reuse_kv", [("prefix", False), ("grid", False)])
def test_severed_flow_every_engine_mode(mt, mode, reuse_kv):
    from rome_fast.trace.engine import TraceEngine
    ref = ct.calculate_severed_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, token_range=None, sever="mlp",
                                    backend="reference")
    fast = ct.calculate_severed_flow(mt, PROMPT, SUBJECT, samples=3, noise=NOISE, token_range=None, sever="mlp",
                                     engine=TraceEngine(mt, mode=mode, reuse_kv=reuse_kv))
    torch.testing.assert_close(fast["scores"], ref["scores"], **SCORES)


def test_severed_flow_several_facts_in_one_batch(mt):
    """Facts of different lengths padded together: each equals its own reference trace."""
    from rome_fast.tokens import find_token_range
    from rome_fast.trace.engine import FactInput, TraceEngine
    from rome_fast.trace.noise import noise_draws
    facts, refs = [], []
    for prompt, subject in [(PROMPT, SUBJECT), ("Miles Davis plays the", "Miles Davis")]:
        ids = mt.tokenizer.encode(prompt)
        b, e = find_token_range(mt.tokenizer, ids, subject)
        first, second = noise_draws(3, e - b, mt.adapter.hidden_size, NOISE, count=2)
        facts.append(FactInput(ids, (b, e), first, sever_noise=second))
        refs.append(ct.calculate_severed_flow(mt, prompt, subject, samples=3, noise=NOISE, token_range=None,
                                              sever="attn", backend="reference"))
    for res, ref in zip(TraceEngine(mt).trace(facts, kinds=("hidden",), sever="attn"), refs):
        torch.testing.assert_close(res.scores["hidden"], ref["scores"], **SCORES)


def test_main_is_the_reference_command_line(tmp_path, one_thread, make_facts_file):
    """Fact 7 predicted as expected (a heat map per kind, id <= 200), fact 8 not (skipped)."""
    path = make_facts_file("tiny:gpt2", [(PROMPT, SUBJECT), ("Miles Davis plays the", "Miles Davis")],
                           wrong={1}, first_id=7)
    ct.main(["--model_name", "tiny:gpt2", "--fact_file", str(path), "--noise_level", "0.5",
             "--output_dir", str(tmp_path / "{model_name}" / "causal_trace")])
    out = tmp_path / "n0.5_r0_tiny:gpt2" / "causal_trace"
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(
        f"knowledge_{i}{s}.npz" for i in (7, 8) for s in ("", "_mlp", "_attn"))
    with np.load(out / "cases" / "knowledge_8.npz") as d:
        assert not bool(d["correct_prediction"])
    pdfs = sorted(p.name for p in (out / "pdfs").glob("*.pdf"))
    assert len(pdfs) == 3 and all("_7" in name for name in pdfs)
