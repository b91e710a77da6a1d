"""The reference ROME path on tiny random models of each family: the update's algebra, layouts,
restore, sequential and r-ROME edits, hyperparameters, templates, bad input, and the CLI."""
import dataclasses
import json

import pytest
import torch

from rome_fast.edit import (ROMEHyperParams, apply_rome_to_model, compute_u, execute_rome,
                            get_context_templates, layer_stats, list_presets, normalize_request,
                            rank_one_update, restore_weights, update_matrix)
from rome_fast.edit.templates import generate_context_templates, sample_top_k, start_token_id
from rome_fast.models.random_init import random_texts as synthetic_corpus

FAMILIES = ["gpt2", "llama", "gptj", "gpt_neox"]
LAYER = 1
REQ = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
       "target_new": {"str": "Rome"}}
REQ2 = {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": " football"}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Per family: model, tokenizer, hparams (5 value steps), templates, C⁻¹ from stats."""
    corpus = synthetic_corpus()
    out = {}
    for fam in FAMILIES:
        mt = tiny_models[fam]
        hp = ROMEHyperParams.for_model(mt.model, layer=LAYER)
        hp = dataclasses.replace(hp, v_num_grad_steps=6, mom2_n_samples=300,
                                 context_template_length_params=[[4, 3], [6, 2]])
        templates = get_context_templates(mt.model, mt.tokenizer, hp.context_template_length_params, seed=0)
        stats_dir = tmp_path_factory.mktemp(f"stats-{fam}")
        st = layer_stats(mt.model, mt.tokenizer, hp.rewrite_module_tmp.format(LAYER), stats_dir,
                         "synthetic", sample_size=300, corpus=corpus, progress=False)
        inv = torch.inverse(st.mom2.moment())
        out[fam] = dict(mt=mt, hp=hp, templates=templates, inv=inv, C=st.mom2.moment(),
                        stats_dir=stats_dir, corpus=corpus)
    return out


def _edit(s, request=REQ, key_mode="reference"):
    mt = s["mt"]
    return execute_rome(mt.model, mt.tokenizer, request, s["hp"], context_templates=s["templates"],
                        inv_cov=s["inv"], key_mode=key_mode, return_info=True, progress=False)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fam", FAMILIES)
def test_update_maps_k_star_to_v_star(setup, fam):
    s = setup[fam]
    model = s["mt"].model
    before = _params(model)
    deltas, infos = _edit(s)
    (w_name, (u, right)), = deltas.items()
    info = infos[w_name]
    # execute_rome leaves the model exactly as it was
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert info.steps >= 1 and info.delta.norm() > 0
    module = model.get_submodule(w_name.rsplit(".", 1)[0])
    y_before = module(info.k_star[None])[0]
    torch.testing.assert_close(y_before, info.y_star, rtol=1e-5, atol=1e-5)
    _, orig = apply_rome_to_model(model, s["mt"].tokenizer, [REQ], s["hp"], return_orig_weights=True,
                                  context_templates=s["templates"], inv_cov=s["inv"], progress=False)
    try:
        y_after = module(info.k_star[None])[0]
        rel = (y_after - info.v_star).norm() / info.v_star.norm()
        assert rel <= 1e-4
        # the edit is rank one: ΔW = u ⊗ right in the weight's layout
        dW = model.get_parameter(w_name) - orig[w_name]
        assert torch.linalg.matrix_rank(dW, rtol=1e-4) == 1
    finally:
        restore_weights(model, orig)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fam", FAMILIES)
def test_u_is_normalised_inverse_moment_times_mean_key(setup, fam):
    """u = C⁻¹k̄/‖C⁻¹k̄‖ with k̄ the mean rewrite-module input at the subject's last token,
    collected here with a plain hook and the tokenizer directly."""
    s = setup[fam]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    module = model.get_submodule(hp.rewrite_module_tmp.format(LAYER))
    keys = []
    handle = module.register_forward_hook(lambda m, a, o: keys.append(a[0][0]))
    try:
        for t in s["templates"]:
            prefix = t.format(REQ["prompt"]).split("{}")[0]
            n_pre = len(tok.encode(prefix[:-1])) if prefix else 0
            word = (" " if prefix else "") + REQ["subject"]
            idx = n_pre + len(tok.encode(word)) - 1
            with torch.no_grad():
                model(input_ids=torch.tensor([tok.encode(t.format(REQ["prompt"]).format(REQ["subject"]))]))
            keys[-1] = keys[-1][idx]
    finally:
        handle.remove()
    k_bar = torch.stack(keys).mean(0)
    expected = s["inv"] @ k_bar
    u = compute_u(model, tok, normalize_request(REQ), hp, LAYER, s["templates"], inv_cov=s["inv"])
    torch.testing.assert_close(u, expected / expected.norm(), rtol=1e-4, atol=1e-5)
    # and from the statistics on disk (no inv_cov given) the same u comes out
    u2 = compute_u(model, tok, normalize_request(REQ), hp, LAYER, s["templates"],
                   stats_dir=s["stats_dir"], corpus=s["corpus"])
    torch.testing.assert_close(u2, u, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_keys_with_zero_projection_on_u_are_unchanged(setup, fam):
    """Ŵk = Wk exactly when kᵀC⁻¹k̄ = 0 (k ⊥ u); any other key moves along `right` by ⟨k,u⟩."""
    s = setup[fam]
    model = s["mt"].model
    deltas, infos = _edit(s)
    (w_name, (u, right)), = deltas.items()
    module = model.get_submodule(w_name.rsplit(".", 1)[0])
    g = torch.Generator().manual_seed(0)
    K = torch.randn(8, u.numel(), generator=g)
    K_perp = K - (K @ u)[:, None] * u[None] / u.norm() ** 2
    ck = s["inv"] @ infos[w_name].k_bar  # u ∝ C⁻¹k̄, so these keys have kᵀC⁻¹k̄ = 0
    assert (K_perp @ ck).abs().max() <= 1e-4 * ck.norm() * K_perp.norm(dim=1).max()
    with torch.no_grad():
        y0, y0_perp = module(K), module(K_perp)
        W = model.get_parameter(w_name)
        saved = W.clone()
        rank_one_update(W, u, right, "in_out" if fam == "gpt2" else "out_in")
        y1, y1_perp = module(K), module(K_perp)
        W.copy_(saved)
    torch.testing.assert_close(y1_perp, y0_perp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1 - y0, (K @ u)[:, None] * right[None], rtol=1e-4, atol=1e-5)


def test_layouts():
    u, r = torch.randn(6), torch.randn(4)
    torch.testing.assert_close(update_matrix(u, r, "in_out"), torch.outer(u, r))
    torch.testing.assert_close(update_matrix(u, r, "out_in"), torch.outer(r, u))
    W = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="does not fit"):
        rank_one_update(W, u, r, "in_out")
    rank_one_update(W, u, r, "out_in")
    torch.testing.assert_close(W, torch.outer(r, u))


def test_conv1d_and_linear_weights_get_the_right_orientation(setup):
    for fam in ("gpt2", "llama"):
        s = setup[fam]
        deltas, _ = _edit(s)
        (w_name, (u, right)), = deltas.items()
        model = s["mt"].model
        _, orig = apply_rome_to_model(model, s["mt"].tokenizer, [REQ], s["hp"], return_orig_weights=True,
                                      context_templates=s["templates"], inv_cov=s["inv"], progress=False)
        dW = model.get_parameter(w_name) - orig[w_name]
        restore_weights(model, orig)
        expect = torch.outer(u, right) if fam == "gpt2" else torch.outer(right, u)  # Conv1D (in, out)
        torch.testing.assert_close(dW, expect, rtol=1e-4, atol=1e-6)


def test_restore_is_bitwise_and_copy_leaves_the_original(setup):
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    before = _params(model)
    edited, orig = apply_rome_to_model(model, tok, [REQ], s["hp"], copy=True, return_orig_weights=True,
                                       context_templates=s["templates"], inv_cov=s["inv"], progress=False)
    assert edited is not model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (name,) = orig
    assert not torch.equal(edited.get_parameter(name), before[name])
    restore_weights(edited, orig)
    assert all(torch.equal(p, before[n]) for n, p in edited.named_parameters())
    _, none = apply_rome_to_model(edited, tok, [REQ], s["hp"], context_templates=s["templates"],
                                  inv_cov=s["inv"], progress=False)
    assert none == {}


def test_sequential_requests_build_on_each_other(setup):
    s = setup["gpt2"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    kw = dict(context_templates=s["templates"], inv_cov=s["inv"], progress=False)
    # the reference backend throughout (apply_rome_to_model's default is the fast one)
    _, orig = apply_rome_to_model(model, tok, [REQ, REQ2], hp, return_orig_weights=True,
                                  backend="reference", **kw)
    both = {n: model.get_parameter(n).detach().clone() for n in orig}
    restore_weights(model, orig)
    # by hand: apply the first, then compute the second on the edited model
    _, orig1 = apply_rome_to_model(model, tok, [REQ], hp, return_orig_weights=True, backend="reference", **kw)
    deltas2, infos2 = execute_rome(model, tok, REQ2, hp, return_info=True, **kw)
    (name, (u2, r2)), = deltas2.items()
    with torch.no_grad():
        rank_one_update(model.get_parameter(name), u2, r2, "in_out")
    torch.testing.assert_close(model.get_parameter(name), both[name], rtol=0, atol=1e-6)
    # the last request holds exactly on the sequentially edited model
    module = model.get_submodule(name.rsplit(".", 1)[0])
    v2 = infos2[name].v_star
    assert (module(infos2[name].k_star[None])[0] - v2).norm() / v2.norm() <= 1e-4
    restore_weights(model, orig1)
    assert torch.equal(model.get_parameter(name), orig[name])


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_r_rome_maps_the_template_mean_key(setup, fam):
    s = setup[fam]
    model = s["mt"].model
    deltas, infos = _edit(s, key_mode="r-rome")
    (w_name, (u, right)), = deltas.items()
    info = infos[w_name]
    ref_deltas, ref_infos = _edit(s)
    torch.testing.assert_close(u, ref_deltas[w_name][0])  # same direction C⁻¹k̄
    torch.testing.assert_close(info.k_star, info.k_bar)    # k̄ replaces k*
    module = model.get_submodule(w_name.rsplit(".", 1)[0])
    W = model.get_parameter(w_name)
    saved = W.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(module(info.k_bar[None])[0], info.y_star, rtol=1e-5, atol=1e-5)
        rank_one_update(W, u, right, "in_out" if fam == "gpt2" else "out_in")
        y = module(info.k_bar[None])[0]
        W.copy_(saved)
    assert (y - info.v_star).norm() / info.v_star.norm() <= 1e-4
    assert not torch.allclose(right, ref_deltas[w_name][1])


def test_value_loop_follows_the_reference_schedule(setup):
    s = setup["llama"]
    hp = dataclasses.replace(s["hp"], v_num_grad_steps=4, clamp_norm_factor=0.05)
    mt = s["mt"]
    _, infos = execute_rome(mt.model, mt.tokenizer, REQ, hp, context_templates=s["templates"],
                            inv_cov=s["inv"], return_info=True)
    info = next(iter(infos.values()))
    assert info.steps == 3 and len(info.losses) == 4  # the last iteration only evaluates
    assert info.losses[0][1] == 0.0 and info.losses[0][2] == 0.0  # δ = 0: no KL, no decay
    assert info.delta.norm() <= 0.05 * info.v_init.norm() * (1 + 1e-5)  # clamped
    torch.testing.assert_close(info.v_star, info.v_init + info.delta)
    torch.testing.assert_close(info.v_init, info.y_star, rtol=1e-4, atol=1e-5)  # no dropout: y* = v_init
    torch.testing.assert_close(info.right, (info.v_star - info.y_star) / info.denom)


# ---- hyperparameters ------------------------------------------------------------------------
REFERENCE_FIELDS = {"layers", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay",
                    "clamp_norm_factor", "kl_factor", "mom2_adjustment", "context_template_length_params",
                    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                    "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype"}


def test_hparams_presets_and_round_trip(tmp_path):
    assert {"gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI_gpt-j-6B", "EleutherAI_gpt-neox-20b",
            "SmolLM2-135M"} <= set(list_presets())
    table = {"gpt2-medium": ([8], 23, 3), "gpt2-large": ([12], 35, 4), "gpt2-xl": ([17], 47, 4),
             "EleutherAI/gpt-j-6B": ([5], 27, 4), "EleutherAI/gpt-neox-20b": ([15], 43, 4)}
    for name, (layers, loss_layer, clamp) in table.items():
        hp = ROMEHyperParams.from_name(name)
        assert (hp.layers, hp.v_loss_layer, hp.clamp_norm_factor) == (layers, loss_layer, clamp)
        assert (hp.v_lr, hp.v_weight_decay, hp.kl_factor, hp.mom2_n_samples) == (0.5, 0.5, 0.0625, 100000)
        assert set(hp.to_dict()) == REFERENCE_FIELDS
        path = tmp_path / "hp.json"
        hp.to_json(path)
        assert ROMEHyperParams.from_json(path) == hp
        assert set(json.loads(path.read_text())) == REFERENCE_FIELDS
    assert ROMEHyperParams.from_name("openai-community/gpt2-xl").layers == [17]
    assert ROMEHyperParams.from_name("HuggingFaceTB/SmolLM2-135M-Instruct").rewrite_module_tmp == \
        "model.layers.{}.mlp.down_proj"
    with pytest.raises(ValueError, match="no ROME preset"):
        ROMEHyperParams.from_name("gpt2")
    (tmp_path / "bad.json").write_text(json.dumps({**ROMEHyperParams.from_name("gpt2-xl").to_dict(), "v_lrr": 1}))
    with pytest.raises(ValueError, match="v_lrr"):
        ROMEHyperParams.from_json(tmp_path / "bad.json")


def test_hparams_for_model(tiny_models):
    model = tiny_models["gpt_neox"].model
    with pytest.raises(ValueError, match="give the layer"):
        ROMEHyperParams.for_model(model)
    hp = ROMEHyperParams.for_model(model, layer=2)
    assert hp.layers == [2] and hp.rewrite_module_tmp == "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    assert hp.v_loss_layer == 3
    with pytest.raises(ValueError, match="out of range"):
        ROMEHyperParams.for_model(model, layer=4)


# ---- templates ------------------------------------------------------------------------------
def test_context_templates_are_seeded_cached_and_brace_free(tiny_models):
    mt = tiny_models["gpt2"]
    a = generate_context_templates(mt.model, mt.tokenizer, [[5, 4], [10, 3]], seed=3)
    b = generate_context_templates(mt.model, mt.tokenizer, [[5, 4], [10, 3]], seed=3)
    c = generate_context_templates(mt.model, mt.tokenizer, [[5, 4], [10, 3]], seed=4)
    assert a == b and a != c
    assert len(a) == 8 and a[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1 for t in a[1:])
    assert all(t.format("X") for t in a)
    first = get_context_templates(mt.model, mt.tokenizer, [[5, 4]], seed=7)
    assert get_context_templates(mt.model, mt.tokenizer, [[5, 4]], seed=7) == first


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_sampling_with_cache_matches_full_recompute(tiny_models, fam):
    """Every sampled token is in the top 5 of the full-context (no cache) distribution: the
    KV-cache loop passes the whole attention mask (the reference's generate_fast did not)."""
    mt = tiny_models[fam]
    ids = sample_top_k(mt.model, start_token_id(mt.tokenizer), 6, 10, 5, torch.Generator().manual_seed(0))
    assert ids.shape == (6, 10)
    with torch.no_grad():
        logits = mt.model(input_ids=ids).logits
    top5 = logits[:, :-1].topk(5, dim=-1).indices
    assert (top5 == ids[:, 1:, None]).any(-1).all()


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    ({"prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": {"str": " Rome"}},
     "already in it"),
    ({"prompt": "It is located in", "subject": "The Eiffel Tower", "target_new": {"str": " Rome"}}, "'{}'"),
    ({"prompt": "{} and {} are", "subject": "X", "target_new": {"str": " Rome"}}, "exactly once"),
    ({"prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": {"str": "  "}}, "target_new"),
    ({"prompt": "{} is in", "subject": "", "target_new": {"str": " Rome"}}, "subject"),
    ({"prompt": "Where({} is", "subject": "X", "target_new": {"str": " Rome"}}, "end with a space"),
    ({"prompt": "{} is in", "subject": "X"}, "missing 'target_new'"),
    ({"prompt": "{} is in the {city} of", "subject": "X", "target_new": {"str": " Rome"}}, r"\{city\}"),
    ({"prompt": "{0} is in", "subject": "X", "target_new": {"str": " Rome"}}, r"\{0\}"),
    ({"prompt": "{} is in {", "subject": "X", "target_new": {"str": " Rome"}}, "literal brace"),
    ({"prompt": "{} is in", "subject": " X ", "target_new": {"str": " Rome"}}, "whitespace"),
    # refused up front, not an IndexError deep inside GPT-2's position embedding
    ({"prompt": "{} is in" + " the town" * 2000, "subject": "X", "target_new": {"str": " Rome"}},
     "exceeds the model's context of"),
])
def test_bad_requests_raise(setup, bad, match):
    s = setup["gpt2"]
    with pytest.raises(ValueError, match=match):
        apply_rome_to_model(s["mt"].model, s["mt"].tokenizer, [bad], s["hp"],
                            context_templates=s["templates"], inv_cov=s["inv"])


def test_bad_options_and_wrong_stats_shape(setup):
    s = setup["llama"]
    mt = s["mt"]
    kw = dict(context_templates=s["templates"], inv_cov=s["inv"])
    with pytest.raises(ValueError, match="backend"):
        apply_rome_to_model(mt.model, mt.tokenizer, [REQ], s["hp"], backend="cuda-magic", **kw)
    with pytest.raises(ValueError, match="key_mode"):
        apply_rome_to_model(mt.model, mt.tokenizer, [REQ], s["hp"], key_mode="mean", **kw)
    before = _params(mt.model)
    with pytest.raises(ValueError, match="key width"):
        execute_rome(mt.model, mt.tokenizer, REQ, s["hp"], context_templates=s["templates"],
                     inv_cov=torch.eye(7))
    assert all(torch.equal(p, before[n]) for n, p in mt.model.named_parameters())
    assert normalize_request(REQ)["target_new"]["str"] == " Rome"
    assert normalize_request({**REQ, "target_new": "Rome"})["target_new"]["str"] == " Rome"


def test_escaped_braces_are_literal_text(setup):
    """"{{" and "}}" in a prompt are braces in the text: the key token is found in the text as
    printed (located here from the tokenizer's character offsets)."""
    from rome_fast.edit.compute_u import key_indices
    tok = setup["gpt2"]["mt"].tokenizer
    prompt, subject = "In {{the}} year {{x}}, {} is in", "The Eiffel Tower"
    r = normalize_request({"prompt": prompt, "subject": subject, "target_new": {"str": "Rome"}})
    assert prompt.format(subject).startswith("In {the} year {x}, The Eiffel Tower")

    def expected(template):
        text = template.format(subject)
        end = text.index(subject) + len(subject)
        enc = tok(text, return_offsets_mapping=True)
        return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= end - 1 < b]

    for template in (r["prompt"], "Context {{here}}. " + r["prompt"]):
        assert key_indices(tok, [template], subject, "subject_last") == expected(template)


# ---- module names come from the adapter -----------------------------------------------------
def test_sites_come_from_the_adapter(tiny_models):
    """Every family: the edited weight, its layout and the key/value widths agree with the weight
    itself, and hyperparameters without module names edit the adapter's modules."""
    from rome_fast.edit import edit_sites
    for fam, mt in tiny_models.items():
        hp = ROMEHyperParams(layers=[2, 1])
        (s1, s2) = edit_sites(mt.model, hp)
        assert (s1.layer, s2.layer) == (1, 2)
        W = mt.model.get_parameter(s1.weight)
        assert s1.weight == s1.rewrite + ".weight" and s1.rewrite.startswith(s1.mlp + ".")
        conv1d = type(mt.model.get_submodule(s1.rewrite)).__name__ == "Conv1D"
        assert s1.layout == ("in_out" if conv1d else "out_in"), fam
        assert tuple(W.shape) == ((s1.key_size, s1.value_size) if conv1d else (s1.value_size, s1.key_size))
        assert s1.value_size == mt.model.config.get_text_config().hidden_size
    assert "rewrite_module_tmp" not in ROMEHyperParams(layers=[1]).to_dict()


@pytest.mark.parametrize("preset,fam", [("gpt2-xl", "gpt2"), ("gpt2-medium", "gpt2"),
                                        ("EleutherAI_gpt-j-6B", "gptj"), ("EleutherAI_gpt-neox-20b", "gpt_neox"),
                                        ("SmolLM2-135M", "llama")])
def test_reference_presets_load_unchanged_and_match_their_family(tiny_models, preset, fam):
    """A bundled preset (the reference's file, e.g. GPT-2's head named `transformer.wte`, tied to
    lm_head, and NeoX's older `embed_out`) loads from_json as it is and passes the adapter check."""
    from rome_fast.edit import edit_sites
    from rome_fast.edit.hparams import PRESET_DIR
    path = PRESET_DIR / f"{preset}.json"
    raw = json.loads(path.read_text())
    hp = ROMEHyperParams.from_json(path)
    assert hp.to_dict() == raw
    hp.layers = [1]
    (site,) = edit_sites(tiny_models[fam].model, hp)
    assert site.rewrite == hp.rewrite_module_tmp.format(1)


@pytest.mark.parametrize("field,value,match", [
    ("mlp_module_tmp", "transformer.h.{}.attn", "not the gpt2 model's MLP"),
    ("rewrite_module_tmp", "transformer.h.{}.mlp.c_fc", "not the gpt2 model's rewrite module"),
    ("rewrite_module_tmp", "model.layers.{}.mlp.down_proj", "not a module of this model"),
    ("layer_module_tmp", "transformer.h.{}.mlp", "not the gpt2 model's transformer block"),
    ("lm_head_module", "transformer.wpe", "not the gpt2 model's unembedding"),
    ("ln_f_module", "transformer.ln_g", "not a module of this model"),
])
def test_module_names_that_are_not_the_adapters_are_refused(setup, field, value, match):
    s = setup["gpt2"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], **{field: value})
    before = _params(model)
    for backend in ("reference", "fast"):
        with pytest.raises(ValueError, match=rf"hparams\.{field} .*{match}.*adapter says"):
            apply_rome_to_model(model, tok, [REQ], hp, backend=backend, context_templates=s["templates"],
                                inv_cov=s["inv"], progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="mlp_module_tmp"):
        ROMEHyperParams(layers=[1], mlp_module_tmp="transformer.h.mlp")  # no '{}' for the layer


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_stats_and_edit(tiny_models, tmp_path, capsys):
    from safetensors.torch import load_file

    from rome_fast.cli import main
    mt = tiny_models["gpt2"]
    mdir = tmp_path / "tiny-gpt2"
    mt.model.save_pretrained(mdir)
    mt.tokenizer.save_pretrained(mdir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic_corpus(120)))
    stats = tmp_path / "stats"
    assert main(["stats", "--model", str(mdir), "--layer", "1", "--corpus", str(corpus),
                 "--samples", "100", "--stats-dir", str(stats), "--device", "cpu"]) == 0
    files = list(stats.rglob("*.npz"))
    assert [f.name for f in files] == ["transformer.h.1.mlp.c_proj_float32_mom2_100.npz"]
    assert files[0].parent.name == "corpus_stats" and files[0].parent.parent.name == "tiny-gpt2"
    hp = ROMEHyperParams.for_model(mt.model, layer=1)
    hp.v_num_grad_steps, hp.context_template_length_params = 4, [[4, 2]]
    hp.to_json(tmp_path / "hp.json")
    delta = tmp_path / "delta.safetensors"
    rc = main(["edit", "--model", str(mdir), "--prompt", "{} is located in the city of",
               "--subject", "The Eiffel Tower", "--target", "Rome", "--corpus", str(corpus),
               "--samples", "100", "--stats-dir", str(stats), "--hparams", str(tmp_path / "hp.json"),
               "--save-delta", str(delta), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "before:" in out and "after:" in out and "p(' Rome')" in out
    d = load_file(delta)
    assert list(d) == ["transformer.h.1.mlp.c_proj.weight"]
    assert torch.linalg.matrix_rank(d["transformer.h.1.mlp.c_proj.weight"], rtol=1e-4) == 1
    assert main(["edit", "--model", str(mdir), "--prompt", "is located in", "--subject", "X",
                 "--target", "Y"]) == 2
    # statistics from fewer keys than the key width: written, with a warning (editing refuses them)
    capsys.readouterr()
    assert main(["stats", "--model", str(mdir), "--layer", "2", "--corpus", str(corpus),
                 "--samples", "3", "--stats-dir", str(stats), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "key width of 256" in err and "at least 256 keys" in err
    rc = main(["edit", "--model", str(mdir), "--prompt", "{} is located in the city of", "--layer", "2",
               "--subject", "The Eiffel Tower", "--target", "Rome", "--corpus", str(corpus),
               "--samples", "3", "--stats-dir", str(stats), "--hparams", str(tmp_path / "hp.json"),
               "--device", "cpu"])
    assert rc == 2 and "at least 256 keys" in capsys.readouterr().err
