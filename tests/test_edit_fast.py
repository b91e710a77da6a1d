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
    corpus = synthetic_corpus()
    out = {}
    for fam in FAMILIES:
        mt = tiny_models[fam]
        hp = ROMEHyperParams.for_model(mt.model, layer=LAYER)
        hp = dataclasses.replace(hp, v_num_grad_steps=6, mom2_n_samples=300, mom2_dataset="synthetic",
                                 context_template_length_params=[[4, 3], [6, 2]])
        templates = get_context_templates(mt.model, mt.tokenizer, hp.context_template_length_params, seed=0)
        stats_dir = tmp_path_factory.mktemp(f"fast-stats-{fam}")
        st = layer_stats(mt.model, mt.tokenizer, hp.rewrite_module_tmp.format(LAYER), stats_dir,
                         "corpus", sample_size=300, corpus=corpus, progress=False)
        out[fam] = dict(mt=mt, hp=hp, templates=templates, stats_dir=stats_dir, corpus=corpus, st=st)
    return out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _kw(s):
    return dict(context_templates=s["templates"], stats_dir=s["stats_dir"], corpus=s["corpus"], progress=False)


def _w(s):
    return s["mt"].model.get_parameter(s["hp"].rewrite_module_tmp.format(LAYER) + ".weight")


@pytest.mark.parametrize("fam", FAMILIES)
def test_value_optimisation_matches_reference(setup, fam):
    s = setup[fam]
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


def test_value_optimisation_early_stop_and_clamp(setup):
    """A large lr hits the norm clamp; a loose threshold via kl_factor=0 still follows the schedule."""
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], v_lr=5.0, clamp_norm_factor=0.5, v_num_grad_steps=4)
    req = dict(REQS[1], target_new={"str": " football"})
    u = torch.ones(model.get_parameter(hp.rewrite_module_tmp.format(LAYER) + ".weight").shape[1])
    _, a = compute_v(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    _, b = fast_compute_v(model, tok, req, hp, LAYER, u, s["templates"], return_info=True)
    assert abs(float(b.delta.norm()) - 0.5 * float(b.v_init.norm())) < 1e-4 * float(b.v_init.norm())
    assert rel(b.delta, a.delta) < TOL and a.steps == b.steps == 3


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


# ---- statistics ---------------------------------------------------------------------------------
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
        model, tok, names[:1], texts[:20], 1024, 3072, torch.float32, progress=False)[names[0]].mom2) < 5e-2


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
    assert not torch.equal(bf.mom2.mom2, exact.mom2.mom2) and rel(bf.mom2.mom2, exact.mom2.mom2) < 5e-2
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
