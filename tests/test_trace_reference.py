"""Reference causal tracing against plainly written computations, and on the embedded model."""
import numpy as np
import pytest
import torch

from rome_fast.models.random_init import RANDOM_FAMILIES
from rome_fast.trace import noise as noise_mod
from rome_fast.trace.api import calculate_hidden_flow
from rome_fast.trace.noise import collect_embedding_std, draw_noise, resolve_noise
from rome_fast.trace.reference import (layername, predict_from_input, trace_important_states,
                                       trace_important_window, trace_with_patch, window_layers)
from rome_fast.tokens import find_token_range, make_inputs

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


# ---- an independent forward: blocks run by hand, restorations written out -----------------------

def _noisy_embeddings(mt, ids, e_range, noise, samples, replace=False):
    x = mt.adapter.embed(torch.tensor([ids] * (samples + 1))).clone()
    b, e = e_range
    z = noise * torch.from_numpy(np.random.RandomState(1).randn(samples, e - b, x.shape[2]))
    x[1:, b:e] = z.float() if replace else x[1:, b:e] + z.float()
    return x


def _restore(x, tokens):
    x = x.clone()
    for t in tokens:
        x[1:, t] = x[0, t]
    return x


def _block_by_hand(mt, layer, h, ctx, kind, tokens):
    """One GPT-2 or Llama block written out, restoring its attn or MLP output at `tokens`."""
    blk = mt.adapter.block(layer)
    fix = (lambda out, k: _restore(out, tokens) if kind == k else out)
    if mt.adapter.family == "gpt2":
        a = blk.attn(blk.ln_1(h), attention_mask=ctx.attention_mask)[0]
        h = h + fix(a, "attn")
        return h + fix(blk.mlp(blk.ln_2(h)), "mlp")
    a = blk.self_attn(hidden_states=blk.input_layernorm(h), attention_mask=ctx.attention_mask,
                      position_ids=ctx.position_ids,
                      position_embeddings=ctx.extra["position_embeddings"])[0]
    h = h + fix(a, "attn")
    return h + fix(blk.mlp(blk.post_attention_layernorm(h)), "mlp")


@torch.no_grad()
def manual_trace(mt, ids, e_range, answer_t, restore: dict, kind=None, noise=0.5, samples=3, replace=False):
    """p(answer) averaged over the corrupted rows, restoring {layer: [tokens]} of `kind`."""
    a = mt.adapter
    h, ctx = a.prepare(_noisy_embeddings(mt, ids, e_range, noise, samples, replace))
    for layer in range(a.num_layers):
        tokens = restore.get(layer, [])
        if kind is None:
            h = a.run_block(layer, h, ctx)
            h = _restore(h, tokens)
        else:
            h = _block_by_hand(mt, layer, h, ctx, kind, tokens)
    probs = torch.softmax(a.head(h[:, -1]), dim=-1)
    return probs[1:].mean(0)[answer_t].item()


def _setup(mt, samples=3):
    inp = make_inputs(mt.tokenizer, [PROMPT] * (samples + 1))
    ids = inp["input_ids"][0].tolist()
    e_range = find_token_range(mt.tokenizer, ids, SUBJECT)
    answer_t = int(predict_from_input(mt.model, inp)[0][0])
    return inp, ids, e_range, answer_t


# ---- noise -------------------------------------------------------------------------------------

def test_draw_noise_is_the_reference_draw():
    expect = 0.25 * np.random.RandomState(1).randn(3, 2, 5)
    got = draw_noise(3, 2, 5, noise=0.25)
    assert got.dtype == torch.float64 and got.shape == (3, 2, 5)
    np.testing.assert_array_equal(got.numpy(), expect)
    np.testing.assert_array_equal(draw_noise(3, 2, 5, noise=0.25).numpy(), expect)  # fresh state each call
    uni = draw_noise(2, 2, 3, noise=0.5, uniform_noise=True)
    np.testing.assert_array_equal(uni.numpy(), 0.5 * np.random.RandomState(1).uniform(-1, 1, (2, 2, 3)))
    np.testing.assert_array_equal(draw_noise(1, 2, 3, noise=lambda z: z + 7).numpy(),
                                  np.random.RandomState(1).randn(1, 2, 3) + 7)


def test_embedding_std_equals_the_hooked_full_model(tiny):
    """The reference records the embedding module's output during a full forward per subject."""
    mt = tiny["gpt2"]
    subjects = ["Eiffel Tower", "Miles Davis", "Paris"]
    seen = []
    hook = mt.adapter.embedding.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().clone()))
    try:
        with torch.no_grad():
            for s in subjects:
                mt.model(**make_inputs(mt.tokenizer, [s]))
    finally:
        hook.remove()
    assert collect_embedding_std(mt, subjects) == pytest.approx(torch.cat(seen).std().item(), rel=1e-6)


def test_noise_rules(tiny):
    mt = tiny["gpt2"]
    subjects = ["Eiffel Tower", "Miles Davis"]
    sigma = collect_embedding_std(mt, subjects)
    level, uniform = resolve_noise("s3", mt, subjects)
    assert level == pytest.approx(3 * sigma) and uniform is False
    assert resolve_noise("s", mt, subjects)[0] == pytest.approx(sigma)
    assert resolve_noise("0.1") == (0.1, False)
    assert resolve_noise(0.2) == (0.2, False)
    assert resolve_noise("u0.5") == (0.5, True)
    t_fn, _ = resolve_noise("t3", mt, subjects)
    z = draw_noise(4, 2, 8, noise=t_fn)
    assert z.shape == (4, 2, 8) and torch.isfinite(z).all()
    texts = ["The Eiffel Tower is in Paris.", "Miles Davis plays the trumpet.", "Berlin is in Germany."]
    m_fn, _ = resolve_noise("m", mt, texts=texts)
    mean, cov = noise_mod.embedding_mean_cov(mt, texts)
    torch.testing.assert_close(m_fn(torch.zeros(1, 1, mean.numel()))[0, 0], mean)
    # the transform's W Wᵀ is the covariance
    eye = torch.eye(mean.numel(), dtype=torch.float64)
    w = m_fn(eye) - mean
    torch.testing.assert_close(w.T @ w, cov, atol=1e-10, rtol=1e-6)


@pytest.mark.parametrize("rule", ["x3", "s", "u", "t", "foo", "", "-0.1", "nan", "s3x"])
def test_unknown_noise_rule(rule, tiny):
    with pytest.raises(ValueError):
        resolve_noise(rule, tiny["gpt2"], ["Eiffel Tower"] if rule != "s" else None)


def test_noise_rule_m_needs_a_corpus(tiny):
    with pytest.raises(ValueError, match="corpus"):
        resolve_noise("m", tiny["gpt2"], ["Eiffel Tower"])


# ---- windows and single traces against the hand-written forward -------------------------------------

def test_window_layers_clip_at_both_ends():
    assert list(window_layers(0, 10, 30)) == [0, 1, 2, 3, 4]
    assert list(window_layers(12, 10, 30)) == list(range(7, 17))  # L-5 ... L+4
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(0, 3, 4)) == [0, 1]
    assert list(window_layers(3, 3, 4)) == [2, 3]
    assert list(window_layers(2, 1, 4)) == [2]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trace_with_patch_matches_hand_forward(tiny, family):
    mt = tiny[family]
    inp, ids, e_range, answer_t = _setup(mt)
    n, last = mt.num_layers, len(ids) - 1
    subj_last = e_range[1] - 1
    low = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=0.5).item()
    assert low == pytest.approx(manual_trace(mt, ids, e_range, answer_t, {}), abs=1e-6)
    replaced = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=0.5, replace=True).item()
    assert replaced == pytest.approx(manual_trace(mt, ids, e_range, answer_t, {}, replace=True), abs=1e-6)

    cells = [(None, subj_last, 0), (None, e_range[0], 1), (None, last, n - 1)]
    got_any_effect = False
    for kind, t, layer in cells:
        got = trace_with_patch(mt.model, inp, [(t, layername(mt.model, layer))], answer_t, e_range, noise=0.5).item()
        assert got == pytest.approx(manual_trace(mt, ids, e_range, answer_t, {layer: [t]}), abs=1e-6)
        got_any_effect |= abs(got - low) > 1e-4
    assert got_any_effect, "restoring states changed nothing: the test model is too weak to test anything"

    # windows of 3 layers at the first and last layers are clipped to 2 layers
    table = {k: trace_important_window(mt.model, n, inp, e_range, answer_t, kind=k, window=3, noise=0.5,
                                       token_range=[subj_last, last]) for k in ("mlp", "attn")}
    for kind in ("mlp", "attn"):
        for row, t in enumerate([subj_last, last]):
            for center in (0, n - 1):
                layers = {L: [t] for L in window_layers(center, 3, n)}
                assert len(layers) == 2
                expect = manual_trace(mt, ids, e_range, answer_t, layers, kind=kind)
                assert table[kind][row, center].item() == pytest.approx(expect, abs=1e-6), (kind, t, center)
    # a window of 10 covers all 4 layers wherever it is centred
    full = trace_important_window(mt.model, n, inp, e_range, answer_t, kind="mlp", window=10, noise=0.5,
                                  token_range=[subj_last])
    expect = manual_trace(mt, ids, e_range, answer_t, {L: [subj_last] for L in range(n)}, kind="mlp")
    torch.testing.assert_close(full[0], torch.full((n,), expect), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_hidden_states_every_family(tiny, family):
    mt = tiny[family]
    inp, ids, e_range, answer_t = _setup(mt)
    rows = [e_range[0], e_range[1] - 1, len(ids) - 1]
    table = trace_important_states(mt.model, mt.num_layers, inp, e_range, answer_t, noise=0.5, token_range=rows)
    assert table.shape == (3, mt.num_layers)
    for i, t in enumerate(rows):
        for layer in range(mt.num_layers):
            expect = manual_trace(mt, ids, e_range, answer_t, {layer: [t]})
            assert table[i, layer].item() == pytest.approx(expect, abs=1e-6), (t, layer)


def test_trace_layers_returns_the_states(tiny):
    mt = tiny["gpt2"]
    inp, ids, e_range, answer_t = _setup(mt)
    names = [layername(mt.model, 0), layername(mt.model, 2)]
    p, states = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=0.5, trace_layers=names)
    assert states.shape == (4, len(ids), 2, mt.adapter.hidden_size)
    assert p.item() == pytest.approx(trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=0.5).item())


# ---- calculate_hidden_flow ------------------------------------------------------------------------

def test_calculate_hidden_flow_dict(tiny):
    mt = tiny["gpt2"]
    r = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=0.5)
    inp, ids, e_range, answer_t = _setup(mt)
    T, N = len(ids), mt.num_layers
    assert r["scores"].shape == (T, N) and r["scores"].device.type == "cpu"
    assert r["subject_range"] == tuple(e_range) and r["kind"] == "" and r["window"] == 10
    assert r["correct_prediction"] is True
    assert r["answer"] == mt.tokenizer.decode([answer_t])
    assert r["input_tokens"] == [mt.tokenizer.decode([i]) for i in ids]
    with torch.no_grad():
        p_clean = torch.softmax(mt.model(torch.tensor([ids])).logits[0, -1], -1)[answer_t].item()
    assert r["high_score"] == pytest.approx(p_clean, abs=1e-6)
    assert r["low_score"] == pytest.approx(manual_trace(mt, ids, e_range, answer_t, {}), abs=1e-6)
    # causal attention: a token before the subject is the same in clean and corrupted runs
    torch.testing.assert_close(r["scores"][: e_range[0]], torch.full((e_range[0], N), r["low_score"]),
                               atol=1e-6, rtol=0)
    last = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=0.5, token_range="subject_last",
                                 kind="hidden")
    torch.testing.assert_close(last["scores"][0], r["scores"][e_range[1] - 1])
    attn = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=0.5, kind="attn", window=3,
                                 token_range=[T - 1])
    assert attn["kind"] == "attn" and attn["window"] == 3 and attn["scores"].shape == (1, N)


def test_wrong_prediction_returns_early(tiny):
    mt = tiny["gpt2"]
    r = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=2, noise=0.5, expect="definitely not this")
    assert r["correct_prediction"] is False and "scores" not in r and "low_score" not in r
    assert isinstance(r["answer"], str) and 0 < r["high_score"] <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(subject="Space Needle"), "does not occur"),
    (dict(prompt=""), "empty prompt"),
    (dict(prompt="   "), "empty prompt"),
    (dict(kind="foo"), "unknown kind"),
    (dict(samples=0), "samples"),
    (dict(window=0), "window"),
    (dict(backend="bogus"), "backend"),
    (dict(token_range="first"), "token_range"),
])
def test_bad_input(tiny, kwargs, match):
    args = dict(prompt=PROMPT, subject=SUBJECT, samples=2, noise=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        calculate_hidden_flow(tiny["gpt2"], **args)


def test_fast_backend_is_dispatched(tiny, monkeypatch):
    import dataclasses

    from rome_fast.trace import api
    seen = {}
    fake = lambda mt, prompt, subject, **kw: seen.update(kw) or {"fast": True}  # noqa: E731
    monkeypatch.setitem(api.BACKENDS, "fast", dataclasses.replace(api.BACKENDS["fast"], hidden_flow=fake))
    out = calculate_hidden_flow(tiny["gpt2"], PROMPT, SUBJECT, samples=2, noise=0.5, kind="hidden",
                                backend="fast")
    assert out == {"fast": True} and seen["kind"] is None and seen["samples"] == 2 and "backend" not in seen


def test_compat_names():
    from rome_fast.compat import causal_trace as ct
    import rome_fast
    for name in ["ModelAndTokenizer", "make_inputs", "decode_tokens", "find_token_range", "predict_token",
                 "predict_from_input", "trace_with_patch", "trace_important_states", "trace_important_window",
                 "calculate_hidden_flow", "collect_embedding_std", "plot_trace_heatmap", "plot_hidden_flow",
                 "layername"]:
        assert callable(getattr(ct, name)), name
        assert hasattr(rome_fast, name), name


def test_compat_accepts_tensors(tiny):
    from rome_fast.compat import causal_trace as ct
    mt = tiny["gpt2"]
    inp = ct.make_inputs(mt.tokenizer, [PROMPT])
    assert ct.find_token_range(mt.tokenizer, inp["input_ids"][0], SUBJECT) == \
        find_token_range(mt.tokenizer, inp["input_ids"][0].tolist(), SUBJECT)
    assert "".join(ct.decode_tokens(mt.tokenizer, inp["input_ids"][0])) == PROMPT
    assert ct.layername(mt.model, 3, "mlp") == "transformer.h.3.mlp"
    assert ct.layername(mt.model, 0, "embed") == "transformer.wte"
    assert ct.predict_token(mt, [PROMPT]) == [mt.tokenizer.decode([int(predict_from_input(mt.model, inp)[0][0])])]


def test_heatmap_files(tiny, tmp_path):
    from rome_fast.trace.plots import guess_subject, plot_trace_heatmap
    mt = tiny["llama"]
    for kind in (None, "mlp"):
        r = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=2, noise=0.5, kind=kind, window=2)
        paths = plot_trace_heatmap(r, savepdf=tmp_path / f"h_{kind}.pdf", modelname="tiny")
        assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
    assert guess_subject("Where is the Eiffel Tower located?") == "Eiffel Tower"
    assert guess_subject("Miles Davis plays the") == "Miles Davis"


# ---- the embedded model ---------------------------------------------------------------------------

def test_embedded_eiffel_tower(embedded):
    """Clean ' Paris' (p≈0.70), collapsed by 3σ noise, largely restored by one early subject state."""
    from rome_fast.demo import BUILTIN_SUBJECTS
    mt = embedded
    noise = 3 * collect_embedding_std(mt, BUILTIN_SUBJECTS[:10])
    inp = make_inputs(mt.tokenizer, [PROMPT] * 11)
    ids = inp["input_ids"][0].tolist()
    e_range = find_token_range(mt.tokenizer, ids, SUBJECT)
    answer_t, high = [d[0] for d in predict_from_input(mt.model, inp)]
    assert mt.tokenizer.decode([int(answer_t)]) == " Paris"
    assert high.item() > 0.5
    low = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=noise).item()
    assert low < 0.1
    iffel = ids.index(mt.tokenizer.encode("The Eiffel")[-1])  # the ' iffel' piece
    assert e_range[0] <= iffel < e_range[1]
    restored = [trace_with_patch(mt.model, inp, [(iffel, layername(mt.model, L))], answer_t, e_range,
                                 noise=noise).item() for L in (1, 3)]
    assert max(restored) - low > 0.5 * (high.item() - low), restored
    # a token before the subject is the same in clean and corrupted runs: restoring it does nothing
    before = trace_with_patch(mt.model, inp, [(0, layername(mt.model, 5))], answer_t, e_range,
                              noise=noise).item()
    assert before == pytest.approx(low, abs=1e-6)
