"""The fast ROME backend against the reference path on tiny random models of each family (Conv1D
and Linear layouts): value optimisation, one and five sequential edits, r-ROME, restore, the
batched rank-n update, and the fast statistics collector (one pass, packing, shared cache)."""
import dataclasses

import pytest
import torch

from rome_fast.edit import (ROMEHyperParams, apply_rome_to_model, compute_u, compute_v, execute_rome,
                            get_context_templates, layer_stats, restore_weights)
from rome_fast.edit.fast import apply_rome_batch, execute_rome_fast
from rome_fast.edit.fast_compute_v import fast_compute_v
from rome_fast.edit.fast_stats import collect_mom2_fast, layer_stats_fast, pack_rows
from rome_fast.edit.solve_update import clear_factor_cache
from rome_fast.edit.stats import collect_mom2
from rome_fast.models.random_init import random_texts as synthetic_corpus

from interrupts import FailOnCall

FAMILIES = ["gpt2", "llama", "gptj", "gpt_neox"]
LAYER = 1
REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": " football"}},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": " English"}},
    {"prompt": "{} is headquartered in", "subject": "Toyota", "target_new": {"str": " Germany"}},
    {"prompt": "{}, which is located in the continent of", "subject": "Vinson Massif",
     "target_new": {"str": " Europe"}},
]
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Per family: model, tokenizer, hparams (6 value steps), seeded templates, and statistics
    collected once by the reference path into a cache both paths read."""
    return {fam: _prepare(tiny_models[fam], tmp_path_factory.mktemp(f"fast-stats-{fam}")) for fam in FAMILIES}


def _prepare(mt, stats_dir):
    corpus = synthetic_corpus()
    hp = ROMEHyperParams.for_model(mt.model, layer=LAYER)
    hp = dataclasses.replace(hp, v_num_grad_steps=6, mom2_n_samples=300, mom2_dataset="synthetic",
                             context_template_length_params=[[4, 3], [6, 2]])
    templates = get_context_templates(mt.model, mt.tokenizer, hp.context_template_length_params, seed=0)
    st = layer_stats(mt.model, mt.tokenizer, hp.rewrite_module_tmp.format(LAYER), stats_dir,
                     "corpus", sample_size=300, corpus=corpus, progress=False)
    return dict(mt=mt, hp=hp, templates=templates, stats_dir=stats_dir, corpus=corpus, st=st)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _kw(s):
    return dict(context_templates=s["templates"], stats_dir=s["stats_dir"], corpus=s["corpus"], progress=False)


def _w(s):
    return s["mt"].model.get_parameter(s["hp"].rewrite_module_tmp.format(LAYER) + ".weight")


@pytest.mark.parametrize("fam", FAMILIES)
def test_value_optimisation_matches_reference(setup, fam):
    _check_value_optimisation(setup[fam])


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_value_optimisation_matches_reference_with_sdpa(tiny_model, tmp_path, fam):
    """sdpa attention: the fast optimisation's boolean masks over [cached prefix | suffix] (eager
    models get additive float masks)."""
    mt = tiny_model(fam, attn="sdpa")
    assert mt.model.config._attn_implementation == "sdpa"
    _check_value_optimisation(_prepare(mt, tmp_path))


def _check_value_optimisation(s):
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    u = compute_u(model, tok, REQS[0] | {"target_new": {"str": " Rome"}}, hp, LAYER, s["templates"],
                  stats_dir=s["stats_dir"], corpus=s["corpus"], progress=False)
    req = dict(REQS[0], target_new={"str": " Rome"})
    r_ref, i_ref = compute_v(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    r_fast, i_fast = fast_compute_v(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    assert i_ref.steps == i_fast.steps == hp.v_num_grad_steps - 1
    assert len(i_ref.losses) == len(i_fast.losses)
    for a, b in zip(i_fast.losses, i_ref.losses):
        for x, y in zip(a, b):
            assert abs(x - y) <= TOL * max(abs(y), 1e-3), (i_fast.losses, i_ref.losses)
    assert torch.equal(i_fast.v_init, i_ref.v_init) or rel(i_fast.v_init, i_ref.v_init) < TOL
    assert i_ref.delta.norm() > 0
    for name in ("delta", "v_star", "right", "k_star", "y_star"):
        assert rel(getattr(i_fast, name), getattr(i_ref, name)) < TOL, name
    assert rel(r_fast, r_ref) < TOL


def test_value_optimisation_clamp_and_full_schedule(setup):
    """A large lr hits the norm clamp; without reaching the threshold both paths run the whole
    schedule (the last iteration only evaluates)."""
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], v_lr=5.0, clamp_norm_factor=0.5, v_num_grad_steps=4)
    req = dict(REQS[1], target_new={"str": " football"})
    u = torch.ones(model.get_parameter(hp.rewrite_module_tmp.format(LAYER) + ".weight").shape[1])
    _, a = compute_v(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    _, b = fast_compute_v(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    assert abs(float(b.delta.norm()) - 0.5 * float(b.v_init.norm())) < 1e-4 * float(b.v_init.norm())
    assert rel(b.delta, a.delta) < TOL and a.steps == b.steps == 3


def _easiest_target(model, tok):
    """A one-token target the head can make near-certain: the token whose unembedding row gives it
    the highest probability when the final hidden state points along that row."""
    from rome_fast.models import adapter_for
    W = adapter_for(model).lm_head().weight.detach().float()
    d = W.shape[1]
    logp = torch.log_softmax(W @ (W / W.norm(dim=1, keepdim=True)).T * d ** 0.5, dim=0).diagonal()
    for i in logp.argsort(descending=True).tolist():
        text = tok.decode([i])
        if text.startswith(" ") and text.strip().isalpha() and tok(text, add_special_tokens=False)["input_ids"] == [i]:
            return text


@pytest.mark.parametrize("fam", FAMILIES)
def test_value_optimisation_stops_early_at_the_same_step(setup, fam):
    """With the subject last in the prompt, δ at the last layer reaches the logits directly, so the
    loss (kl_factor=0: NLL plus a small decay) falls below the 5e-2 threshold well before the last
    iteration: both paths must stop at the same step, with the same δ."""
    s = setup[fam]
    model, tok = s["mt"].model, s["mt"].tokenizer
    n = 30
    hp = dataclasses.replace(s["hp"], layers=[3], v_lr=1.0, clamp_norm_factor=10.0, v_weight_decay=1e-4,
                             kl_factor=0.0, v_num_grad_steps=n)
    req = {"prompt": "The Louvre is a museum in {}", "subject": "the city of",
           "target_new": {"str": _easiest_target(model, tok)}}
    u = torch.ones(_key_width(model, fam))
    _, a = compute_v(model, tok, req, hp, 3, u, s["templates"], return_info=True)
    _, b = fast_compute_v(model, tok, req, hp, 3, u, s["templates"], return_info=True)
    assert 2 <= a.steps == b.steps < n - 1, (a.losses, b.losses)
    assert len(a.losses) == len(b.losses) == a.steps + 1  # stopped on the check, before a step
    for losses in (a.losses, b.losses):
        assert sum(losses[-1]) < 5e-2 <= min(sum(x) for x in losses[:-1])
        assert all(kl == 0.0 for _, kl, _ in losses)  # kl_factor = 0
    assert rel(b.delta, a.delta) < TOL


# ---- the shared pieces against plain model calls written here -----------------------------------
REWRITE = {"gpt2": "transformer.h.{}.mlp.c_proj", "gptj": "transformer.h.{}.mlp.fc_out",
           "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h", "llama": "model.layers.{}.mlp.down_proj"}
MLP = {"gpt2": "transformer.h.{}.mlp", "gptj": "transformer.h.{}.mlp", "gpt_neox": "gpt_neox.layers.{}.mlp",
       "llama": "model.layers.{}.mlp"}


def _subject_row(tok, template, prompt, subject, suffix=""):
    """Token ids of one filled row and the index of the subject's last token, found from the
    tokenizer's character offsets (not from piecewise token counts as the package does)."""
    with_prompt = template.replace("{}", prompt, 1)
    end = with_prompt.index("{}") + len(subject)
    text = with_prompt.replace("{}", subject, 1) + suffix
    enc = tok(text, return_offsets_mapping=True)
    (at,) = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= end - 1 < b]
    return enc["input_ids"], at


def _run(model, ids, hooks=()):
    """Logits of one unpadded row with forward hooks [(module, hook)] in place."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        return model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def _adder(delta, at):
    def hook(_m, _a, out):
        out = out.clone()
        out[0, at] = out[0, at] + delta
        return out
    return hook


def _hand_loss(model, tok, fam, hp, layer, req, templates, delta, kl_init=None):
    """(nll, kl-row log-probabilities) at δ, one plain forward per row, δ added by a hook here."""
    mlp = model.get_submodule(MLP[fam].format(layer))
    t_ids = tok(req["target_new"]["str"], add_special_tokens=False)["input_ids"]
    forced = tok.decode(t_ids[:-1])
    nlls = []
    for c in templates:
        ids, at = _subject_row(tok, c, req["prompt"], req["subject"], forced)
        logp = torch.log_softmax(_run(model, ids, [(mlp, _adder(delta, at))]), -1)
        first = len(ids) - len(t_ids)  # logits there score the first target token
        nlls.append(-sum(logp[first + j, t] for j, t in enumerate(t_ids)) / len(t_ids))
    ids, at = _subject_row(tok, "{} is a", "{}", req["subject"])
    kl_logp = torch.log_softmax(_run(model, ids, [(mlp, _adder(delta, at))])[at], -1)
    return torch.stack(nlls).mean(), kl_logp


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_first_step_loss_and_update_by_hand(setup, fam, path):
    """One Adam step and the evaluation after it, against the loss computed here: iteration 0
    (δ = 0) gives NLL and no KL or decay; δ₁ is Adam's first step −lr·g/(|g|+ε) on the gradient
    of that NLL (clamped to the ball); iteration 1 reports NLL(δ₁), kl_factor·KL(p(δ₁) ‖ p(0)) at
    the KL row's subject token, and v_weight_decay·‖δ₁‖/‖v_init‖²."""
    s = setup[fam]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], v_num_grad_steps=2, v_lr=2.0, kl_factor=0.5, clamp_norm_factor=1.5)
    req = dict(REQS[2], target_new={"str": " English"})
    run = compute_v if path == "reference" else fast_compute_v
    u = torch.ones(_key_width(model, fam))
    _, info = run(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    assert info.steps == 1 and len(info.losses) == 2

    width = info.v_init.numel()
    zero = torch.zeros(width, requires_grad=True)
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        nll0, kl0 = _hand_loss(model, tok, fam, hp, LAYER, req, s["templates"], zero)
        nll0.backward()
    finally:
        for p, g in zip(model.parameters(), was):
            p.requires_grad_(g)
    g = zero.grad
    with torch.no_grad():
        ids, at = _subject_row(tok, s["templates"][0], req["prompt"], req["subject"])
        seen = []

        def keep(_m, _a, out):
            seen.append(out[0, at].clone())
        _run(model, ids, [(model.get_submodule(MLP[fam].format(LAYER)), keep)])
        v_init = seen[0]
        delta1 = -hp.v_lr * g / (g.abs() + 1e-8)
        limit = hp.clamp_norm_factor * v_init.norm()
        if delta1.norm() > limit:
            delta1 = delta1 * (limit / delta1.norm())
        nll1, kl1 = _hand_loss(model, tok, fam, hp, LAYER, req, s["templates"], delta1)
        kl = hp.kl_factor * float((kl1.exp() * (kl1 - kl0)).sum())
        wd = hp.v_weight_decay * float(delta1.norm() / v_init.norm() ** 2)

    assert rel(info.v_init, v_init) < 1e-5
    assert rel(info.delta, delta1) < 1e-4
    (n0, k0, w0), (n1, k1, w1) = info.losses
    nll0 = float(nll0.detach())
    assert abs(n0 - nll0) < 1e-5 * nll0 and k0 == 0.0 and w0 == 0.0
    assert abs(n1 - float(nll1)) < 1e-4 * float(nll1) and n1 < n0
    assert kl > 1e-4 and abs(k1 - kl) < 1e-4 * kl
    assert abs(w1 - wd) < 1e-5 * wd


def _key_width(model, fam):
    w = model.get_submodule(REWRITE[fam].format(0)).weight
    return w.shape[0] if fam == "gpt2" else w.shape[1]  # Conv1D stores (in, out), Linear (out, in)


@pytest.mark.parametrize("key_mode", ["reference", "r-rome"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_keys_and_values_match_a_hook_capture(setup, fam, backend, key_mode):
    """k̄ (mean key over the templates), k* and y* (the rewrite module's input and output at the
    bare prompt's subject token; k̄ and ȳ with r-ROME) and v_init (the MLP output there), against
    hooks on one unpadded forward per template, written here."""
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    execute = execute_rome if backend == "reference" else execute_rome_fast
    req = REQS[4]
    _, infos = execute(model, tok, req, hp, key_mode=key_mode, return_info=True, **_kw(s))
    (info,) = infos.values()
    rewrite = model.get_submodule(REWRITE[fam].format(LAYER))
    mlp = model.get_submodule(MLP[fam].format(LAYER))
    keys, outs, mlp_outs = [], [], []

    def capture(at):
        def at_rewrite(_m, args, out):
            keys.append(args[0][0, at])
            outs.append(out[0, at])

        def at_mlp(_m, _args, out):
            mlp_outs.append(out[0, at])
        return [(rewrite, at_rewrite), (mlp, at_mlp)]

    with torch.no_grad():
        for c in s["templates"]:
            ids, at = _subject_row(tok, c, req["prompt"], req["subject"])
            _run(model, ids, capture(at))
    assert s["templates"][0] == "{}"  # row 0 is the bare prompt
    k_bar = torch.stack(keys).mean(0)
    k, y = (keys[0], outs[0]) if key_mode == "reference" else (k_bar, torch.stack(outs).mean(0))
    assert rel(info.k_bar, k_bar) < 1e-5
    assert rel(info.k_star, k) < 1e-5 and rel(info.y_star, y) < 1e-5
    assert rel(info.v_init, mlp_outs[0]) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_the_optimised_delta_and_the_edit_raise_the_target(setup, fam, backend):
    """δ added by a hook here at the bare prompt's subject token raises p(target | prompt), and so
    does the edit itself; the probabilities come from plain forwards."""
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    req = dict(REQS[1], target_new={"str": " football"})
    t_ids = tok(" football", add_special_tokens=False)["input_ids"]
    ids, at = _subject_row(tok, "{}", req["prompt"], req["subject"])
    mlp = model.get_submodule(MLP[fam].format(LAYER))

    def p_target(delta=None):
        with torch.no_grad():
            hooks = [] if delta is None else [(mlp, _adder(delta, at))]
            logp = torch.log_softmax(_run(model, ids + t_ids[:-1], hooks), -1)
        return float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(t_ids)))  # log p(target)

    execute = execute_rome if backend == "reference" else execute_rome_fast
    _, infos = execute(model, tok, req, hp, return_info=True, **_kw(s))
    (info,) = infos.values()
    before = p_target()
    assert p_target(info.delta) > before + 0.1
    _, orig = apply_rome_to_model(model, tok, [req], hp, return_orig_weights=True, backend=backend, **_kw(s))
    try:
        assert p_target() > before + 0.1
    finally:
        restore_weights(model, orig)


@pytest.mark.parametrize("key_mode", ["reference", "r-rome"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_one_and_five_sequential_edits_match_reference(setup, fam, key_mode):
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    W = _w(s)
    W0 = W.detach().clone()
    results = {}
    for backend in ("reference", "fast"):
        clear_factor_cache()
        after = []
        _, orig = apply_rome_to_model(model, tok, REQS[:1], hp, return_orig_weights=True, key_mode=key_mode,
                                      backend=backend, **_kw(s))
        after.append(W.detach().clone())
        _, orig4 = apply_rome_to_model(model, tok, REQS[1:], hp, return_orig_weights=True, key_mode=key_mode,
                                       backend=backend, **_kw(s))
        after.append(W.detach().clone())
        assert torch.equal(orig4[next(iter(orig4))], after[0])
        restore_weights(model, orig)
        assert torch.equal(W, W0), "restore is bitwise"
        results[backend] = after
    for i, n in enumerate((1, 5)):
        upd_ref, upd_fast = results["reference"][i] - W0, results["fast"][i] - W0
        assert upd_ref.norm() > 0
        assert rel(upd_fast, upd_ref) < TOL, f"update after {n} edits"
        assert rel(results["fast"][i], results["reference"][i]) < TOL


@pytest.mark.parametrize("fam", ["gpt2", "gptj"])
def test_execute_fast_leaves_model_and_reports_like_reference(setup, fam):
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    d_ref, i_ref = execute_rome(model, tok, REQS[2], hp, return_info=True, **_kw(s))
    d_fast, i_fast = execute_rome_fast(model, tok, REQS[2], hp, return_info=True, **_kw(s))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert d_ref.keys() == d_fast.keys()
    for w in d_ref:
        assert rel(d_fast[w][0], d_ref[w][0]) < TOL and rel(d_fast[w][1], d_ref[w][1]) < TOL
        assert abs(i_fast[w].denom - i_ref[w].denom) < TOL * abs(i_ref[w].denom)


def test_fast_is_default_and_given_inverse_matches(setup):
    s = setup["gpt_neox"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    W = _w(s)
    W0 = W.detach().clone()
    inv = torch.inverse(s["st"].mom2.moment())
    _, orig = apply_rome_to_model(model, tok, REQS[3], hp, return_orig_weights=True, inv_cov=inv, **_kw(s))
    fast = W.detach().clone()
    restore_weights(model, orig)
    _, orig = apply_rome_to_model(model, tok, REQS[3], hp, return_orig_weights=True, inv_cov=inv,
                                  backend="reference", **_kw(s))
    ref = W.detach().clone()
    restore_weights(model, orig)
    assert torch.equal(W, W0)
    assert rel(fast - W0, ref - W0) < TOL


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_batched_rank_n_equals_one_by_one(setup, fam):
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    W = _w(s)
    W0 = W.detach().clone()
    _, orig, ((name, (U, R)),) = (lambda r: (r[0], r[1], tuple(r[2].items())))(
        apply_rome_batch(model, tok, REQS[:3], hp, return_orig_weights=True, **_kw(s)))
    batched = W.detach().clone()
    restore_weights(model, orig)
    assert torch.equal(W, W0) and U.shape[1] == 3
    # one by one: each request's own execute (computed on the unedited model), applied in turn
    deltas = [execute_rome_fast(model, tok, r, hp, **_kw(s))[name] for r in REQS[:3]]
    with torch.no_grad():
        for u, right in deltas:
            W.add_(torch.outer(u, right) if W.shape[0] == u.numel() else torch.outer(right, u))
    one_by_one = W.detach().clone()
    W.copy_(W0)
    assert rel(batched - W0, one_by_one - W0) < TOL
    for j, (u, right) in enumerate(deltas):
        assert rel(U[:, j], u) < TOL and rel(R[:, j], right) < TOL


def test_bad_inputs(setup):
    s = setup["gpt2"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    with pytest.raises(ValueError, match="key_mode"):
        apply_rome_to_model(model, tok, REQS[0], hp, key_mode="bogus", **_kw(s))
    with pytest.raises(ValueError, match="exactly once"):
        apply_rome_to_model(model, tok, {"prompt": "x", "subject": "y", "target_new": {"str": "z"}}, hp, **_kw(s))
    with pytest.raises(ValueError, match="one layer"):
        apply_rome_batch(model, tok, REQS[:2], dataclasses.replace(hp, layers=[0, 1]), **_kw(s))
    with pytest.raises(ValueError, match="outside"):
        fast_compute_v(model, tok, dict(REQS[0], target_new={"str": " Rome"}), hp, 99,
                       torch.ones(256), s["templates"])


# ---- failures part-way leave the weights as they were ------------------------------------------
def _all_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bitwise_same(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.fixture
def value_calls(monkeypatch):
    """Counts value optimisations (both paths share `optimise_delta`; `.calls`); `.at = n` makes
    the n-th call raise `.error`."""
    import importlib
    # the modules (the package re-exports functions of the same names)
    cv, fcv = (importlib.import_module(f"rome_fast.edit.{m}") for m in ("compute_v", "fast_compute_v"))
    return FailOnCall(monkeypatch, cv, "optimise_delta", also=[fcv])


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_bad_later_request_edits_nothing(setup, value_calls, backend):
    s = setup["llama"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    before = _all_params(model)
    bad = {"prompt": "{} is in the {city} of", "subject": "The Louvre", "target_new": {"str": " Rome"}}
    with pytest.raises(ValueError, match=r"request 1: .*\{city\}"):
        apply_rome_to_model(model, tok, [REQS[0], bad], hp, return_orig_weights=True, backend=backend, **_kw(s))
    assert value_calls.calls == 0 and _bitwise_same(model, before)
    # escaped braces are literal text, not a field
    ok = dict(bad, prompt="{} is in the {{city}} of")
    _, orig = apply_rome_to_model(model, tok, [ok], hp, return_orig_weights=True, backend=backend, **_kw(s))
    restore_weights(model, orig)
    assert value_calls.calls == 1 and _bitwise_same(model, before)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("fail_at", [2, 3])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_an_interrupt_part_way_restores_the_weights(setup, value_calls, backend, fail_at, exc):
    """Two edited layers, three requests: the 2nd value optimisation is the first request's upper
    layer (its lower layer already edited in place), the 3rd the second request's first layer."""
    s = setup["gpt2"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], layers=[1, 2])
    value_calls.at, value_calls.error = fail_at, exc
    before = _all_params(model)
    with pytest.raises(exc):
        apply_rome_to_model(model, tok, REQS[:3], hp, return_orig_weights=True, backend=backend, **_kw(s))
    assert value_calls.calls == fail_at and _bitwise_same(model, before)


def _write_stats(path, mom2: torch.Tensor, count: int, sample_size: int):
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"mom2.mom2": mom2.numpy(), "mom2.count": np.array(count),
                      "sample_size": np.array(sample_size)})


def _bad_stats(kind, d):
    g = torch.Generator().manual_seed(0)
    if kind == "few_keys":  # 100 keys for a width of 256: rank 100, singular
        K = torch.randn(100, d, generator=g)
        return K.T @ K, 100
    if kind == "indefinite":  # a symmetric C with a few negative eigenvalues
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        ev = torch.linspace(1.0, 0.01, d, dtype=torch.float64)
        ev[-3:] = -1e-3
        return ((Q * ev) @ Q.T * 5000).float(), 5000
    m = torch.eye(d) * 5000  # "nan"
    m[3, 4] = float("nan")
    return m, 5000


@pytest.mark.parametrize("kind,match", [("few_keys", r"100 keys for a key width of 256.*at least 256 keys"),
                                        ("indefinite", r"not positive definite.*delete it"),
                                        ("nan", r"NaN.*delete it")])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_bad_statistics_are_refused_before_the_value_optimisation(setup, value_calls, tmp_path, backend,
                                                                  kind, match):
    from rome_fast.edit import StatisticsError
    from rome_fast.edit.stats import stats_model_name, stats_path
    s = setup["llama"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    path = stats_path(tmp_path, stats_model_name(model), "corpus", hp.rewrite_module_tmp.format(LAYER),
                      "float32", ("mom2",), hp.mom2_n_samples)
    _write_stats(path, *_bad_stats(kind, 256), hp.mom2_n_samples)
    clear_factor_cache()
    before = _all_params(model)
    kw = dict(_kw(s), stats_dir=tmp_path)
    error = ValueError if kind == "nan" else StatisticsError
    with pytest.raises(error, match=match) as got:
        apply_rome_to_model(model, tok, REQS[:2], hp, return_orig_weights=True, backend=backend, **kw)
    assert str(path) in str(got.value)
    assert value_calls.calls == 0 and _bitwise_same(model, before)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_mom2_ridge_regularises_only_when_asked(setup, tmp_path, backend):
    """Statistics from too few keys are refused, and edited with C + ridge·mean(diag C)·I when
    hparams.mom2_ridge asks for it: u is then that matrix's solve, computed here."""
    from rome_fast.edit import StatisticsError
    from rome_fast.edit.stats import stats_model_name, stats_path
    s = setup["gpt2"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], mom2_ridge=1e-2)
    mom2, count = _bad_stats("few_keys", 256)
    path = stats_path(tmp_path, stats_model_name(model), "corpus", hp.rewrite_module_tmp.format(LAYER),
                      "float32", ("mom2",), hp.mom2_n_samples)
    _write_stats(path, mom2, count, hp.mom2_n_samples)
    clear_factor_cache()
    kw = dict(_kw(s), stats_dir=tmp_path)
    execute = execute_rome if backend == "reference" else execute_rome_fast
    with pytest.raises(StatisticsError, match="mom2_ridge"):
        execute(model, tok, REQS[0], s["hp"], **kw)
    deltas, infos = execute(model, tok, REQS[0], hp, return_info=True, **kw)
    ((u, _),), (info,) = deltas.values(), infos.values()
    C = mom2.double() / count
    C = C + 1e-2 * C.diagonal().mean() * torch.eye(256, dtype=torch.float64)
    expect = torch.linalg.solve(C, info.k_bar.double())
    assert rel(u, expect / expect.norm()) < 1e-4
    with pytest.raises(ValueError, match="mom2_ridge"):
        dataclasses.replace(hp, mom2_ridge=-1.0)


# ---- statistics ---------------------------------------------------------------------------------
# A bf16 forward (act_dtype) against the exact fp32 statistics, |ΔC|_F / |C|_F: measured at most
# 9.8e-3 on the tiny models (5 families, seeds 1-3, layers 0-2; fp16 1.2e-3) and 6.3e-3 on the
# embedded model (benchmarks/results/edit_cpu.json): each key comes through bf16 blocks whose
# every output is rounded to 8 significant bits (2^-9 = 2e-3 relative a rounding).
BF16_STATS_REL = 2e-2
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_fast_stats_one_pass_packed_equals_reference(setup, fam):
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    names = [hp.rewrite_module_tmp.format(l) for l in (0, 2)]
    texts = s["corpus"][:60]
    ref = {n: collect_mom2(model, tok, [n], texts, 1024, 3072, torch.float64, progress=False)[n] for n in names}
    info = {}
    packed = collect_mom2_fast(model, tok, names, texts, 1024, 3072, torch.float64, progress=False,
                               row_tokens=128, stats_out=info)
    padded = collect_mom2_fast(model, tok, names, texts, 1024, 3072, torch.float64, packed=False, progress=False)
    assert info["tokens"] == ref[names[0]].count
    for n in names:
        assert packed[n].count == padded[n].count == ref[n].count
        assert rel(packed[n].mom2, ref[n].mom2) < 1e-6
        assert rel(padded[n].mom2, ref[n].mom2) < 1e-6
        assert rel(packed[n].mom2, padded[n].mom2) < 1e-6
    bf = collect_mom2_fast(model, tok, names[:1], texts[:20], 1024, 3072, torch.float32, act_dtype="bfloat16",
                           progress=False)[names[0]]
    assert bf.mom2.dtype == torch.float32 and rel(bf.mom2, collect_mom2(
        model, tok, names[:1], texts[:20], 1024, 3072, torch.float32, progress=False)[names[0]].mom2) < BF16_STATS_REL


def test_fast_stats_cache_is_interchangeable(setup, tmp_path):
    s = setup["gptj"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    n1, n2 = (hp.rewrite_module_tmp.format(l) for l in (0, 2))
    corpus = s["corpus"][:50]
    # fast writes two layers in one pass; the reference path reads them without collecting
    got = layer_stats_fast(model, tok, [n1, n2], tmp_path, "c", sample_size=40, corpus=corpus, progress=False)
    assert set(got) == {n1, n2} and all(got[n].path.is_file() for n in got)
    ref = layer_stats(model, tok, n2, tmp_path, "c", sample_size=40, corpus=["unused"] * 5, progress=False)
    assert torch.equal(ref.mom2.mom2, got[n2].mom2.mom2.cpu())
    fresh = layer_stats(model, tok, n1, tmp_path / "ref", "c", sample_size=40, corpus=corpus, progress=False)
    assert rel(fresh.mom2.mom2, got[n1].mom2.mom2) < 1e-6
    # the reference's file is read by the fast path (one cached, one collected)
    both = layer_stats_fast(model, tok, [n1, hp.rewrite_module_tmp.format(3)], tmp_path / "ref", "c",
                            sample_size=40, corpus=corpus, progress=False)
    assert torch.equal(both[n1].mom2.mom2, fresh.mom2.mom2)
    with pytest.raises(ValueError, match="act_dtype"):
        collect_mom2_fast(model, tok, [n1], corpus, 64, 256, act_dtype="int8", progress=False)
    with pytest.raises(ValueError, match="no module"):
        layer_stats_fast(model, tok, ["nope.c_proj"], None, "c", corpus=corpus, progress=False)


def test_half_precision_stats_have_their_own_files(setup, tmp_path):
    s = setup["llama"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    name = hp.rewrite_module_tmp.format(1)
    corpus = s["corpus"][:30]
    exact = layer_stats_fast(model, tok, name, tmp_path, "c", sample_size=30, corpus=corpus, progress=False)
    bf = layer_stats_fast(model, tok, name, tmp_path, "c", sample_size=30, corpus=corpus, progress=False,
                          act_dtype="bfloat16")
    assert bf.path != exact.path and bf.path.name.endswith("_act-bfloat16.npz")
    assert not torch.equal(bf.mom2.mom2, exact.mom2.mom2) and rel(bf.mom2.mom2, exact.mom2.mom2) < BF16_STATS_REL
    # the exact file is untouched, and each is read back from its own file
    again = layer_stats_fast(model, tok, name, tmp_path, "c", sample_size=30, corpus=["unused"], progress=False)
    assert torch.equal(again.mom2.mom2, exact.mom2.mom2)
    with pytest.raises(ValueError, match="mom2_act_dtype"):
        dataclasses.replace(hp, mom2_act_dtype="int8")
    with pytest.raises(ValueError, match="fast-backend option"):
        apply_rome_to_model(model, tok, REQS[0], dataclasses.replace(hp, mom2_act_dtype="bfloat16"),
                            backend="reference", **_kw(s))


def test_pack_rows():
    rows = pack_rows([5, 9, 3, 20, 1, 7], 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lens = [5, 9, 3, 20, 1, 7]
    assert all(sum(lens[i] for i in r) <= 10 or len(r) == 1 for r in rows)
    assert len(rows) == 4  # [20], [9,1], [7,3], [5]


# ---- sequential evaluation --------------------------------------------------------------------
def test_sequential_eval_accumulates_and_restores(setup, tmp_path):
    import json

    from rome_fast.eval import datasets as D
    from rome_fast.eval import runner as R
    s = setup["llama"]
    mt, hp = s["mt"], s["hp"]
    compact = [dict(case_id=i, prompt=r["prompt"].format(r["subject"]), subject=r["subject"],
                    target_new=r["target_new"]["str"].strip(), ground_truth="Paris",
                    rephrase_prompt=r["prompt"].format(r["subject"]) + " the",
                    locality_prompt="The Louvre is in", locality_ground_truth="Paris")
               for i, r in enumerate(REQS[:3])]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(compact))
    records = D.load_counterfact(path)
    W = _w(s)
    W0 = W.detach().clone()
    kw = dict(editor_kwargs=dict(key_mode="r-rome", **_kw(s)), skip_generation=True, progress=False)
    R.evaluate(mt, "counterfact", records, hp, tmp_path / "seq", sequential=True, **kw)
    assert torch.equal(W, W0), "the original weights come back after a sequential run"
    seq = [json.loads((tmp_path / "seq" / f"case_{i}.json").read_text()) for i in range(3)]
    assert [c["edits"] for c in seq] == [1, 2, 3]
    assert json.loads((tmp_path / "seq" / "run.json").read_text())["key_mode"] == "r-rome"
    mon = json.loads((tmp_path / "seq" / "monitor.json").read_text())   # the collapse monitor, per edit
    assert [b["edits"] for b in mon["batches"]] == [1, 2, 3]
    assert all(v > 0 for b in mon["batches"] for v in b["update_norm"].values()) and mon["batches"][2]["kl"] > 0
    R.evaluate(mt, "counterfact", records, hp, tmp_path / "ind", **kw)
    ind = [json.loads((tmp_path / "ind" / f"case_{i}.json").read_text()) for i in range(3)]
    assert seq[0]["pre"] == ind[0]["pre"]        # nothing edited yet
    assert seq[2]["pre"] != ind[2]["pre"]        # two earlier edits are in the model
    with pytest.raises(ValueError, match="not resumable"):
        R.evaluate(mt, "counterfact", records, hp, tmp_path / "seq", sequential=True, **kw)


def test_eval_cli_has_sequential_and_key_mode():
    import argparse

    from rome_fast.eval.commands import add_parsers
    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers())
    a = p.parse_args(["eval", "--out", "x", "--sequential", "--key-mode", "r-rome"])
    assert a.sequential and a.key_mode == "r-rome"
