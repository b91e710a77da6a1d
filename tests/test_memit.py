"""MEMIT on tiny random models of four families: the fast backend against the reference path
(1, 8 and 64 edits), batched z against one-by-one z, both solve paths against a direct fp64 solve,
bitwise restoration, bad input, and the hyperparameter files."""
import dataclasses
import json

import pytest
import torch

from rome_fast.edit import restore_weights
from rome_fast.edit.backend import get_backend
from rome_fast.edit.memit import (MEMITHyperParams, SingularSystemError, apply_memit_to_model, compute_z,
                                  compute_zs, execute_memit, get_context_templates, list_presets, solve,
                                  solve_reference)
from rome_fast.edit.memit.hparams import PRESET_DIR
from rome_fast.edit.rome import normalize_request
from rome_fast.edit.covariance import StatisticsError
from rome_fast.edit.solve_update import CovarianceFactor
from rome_fast.edit.fast_stats import layer_stats_fast
from rome_fast.edit.stats import corpus_ds_name, layer_stats
from rome_fast.models.random_init import random_texts

from interrupts import FailOnCall

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama"]
LAYERS = [1, 2]
TOL = 1e-4  # edited weights (and everything downstream of z), relative
# z is an Adam iterate: Adam's first step is ≈ lr·sign(g), so a gradient component near zero turns
# fp32 rounding (summation order of the batched vs the per-request path) into a visible step.
# Measured: up to 1.04e-4 (tiny GPT-J, 64 requests, one request of 64, AVX2 CPU), 1e-7..3e-5 elsewhere;
# the weights those z give stay within TOL.
Z_TOL = 3e-4

pytestmark = pytest.mark.usefixtures("one_thread")

_SUBJECTS = ["The Eiffel Tower", "Michael Jordan", "Danielle Darrieux", "Toyota", "Vinson Massif", "Apple",
             "Berlin", "Lionel Messi", "Miles Davis", "The Louvre", "Mount Everest", "The Nile", "Steve Jobs",
             "Madrid", "The Colosseum", "Brazil"]
_PROMPTS = ["{} is located in the city of", "{} plays the sport of", "The mother tongue of {} is",
            "{} is headquartered in", "{}, which is located in the continent of", "{} was founded by"]
_TARGETS = ["Rome", " football", " English", " Germany", " Paris", " Japan", " Egypt", " trumpet"]


def requests(n):
    """n requests with distinct (subject, prompt) pairs; subjects repeat across prompts."""
    return [{"prompt": _PROMPTS[i % len(_PROMPTS)],
             "subject": _SUBJECTS[i % len(_SUBJECTS)] + ("" if i < len(_SUBJECTS) else f" {i // len(_SUBJECTS)}"),
             "target_new": {"str": _TARGETS[i % len(_TARGETS)]}} for i in range(n)]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Per family: model, tokenizer, hparams (6 steps, λ = 1), seeded templates, and statistics of
    the edited layers collected once into a cache both backends read."""
    corpus = list(random_texts())
    out = {}
    for fam in FAMILIES:
        mt = tiny_models[fam]
        hp = MEMITHyperParams.for_model(mt.model, layers=LAYERS)
        hp = dataclasses.replace(hp, v_num_grad_steps=6, mom2_n_samples=300, mom2_dataset="synthetic",
                                 mom2_update_weight=1.0)
        templates = get_context_templates(mt.model, mt.tokenizer, seed=0)
        stats_dir = tmp_path_factory.mktemp(f"memit-stats-{fam}")
        layer_stats_fast(mt.model, mt.tokenizer, [hp.rewrite_module_tmp.format(l) for l in LAYERS], stats_dir,
                         corpus_ds_name(corpus), sample_size=300, corpus=corpus, progress=False)
        out[fam] = dict(mt=mt, hp=hp, kw=dict(context_templates=templates, stats_dir=stats_dir, corpus=corpus,
                                              progress=False))
    return out


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _updates(s, reqs, backend, hp=None, **extra):
    """{weight: W_after − W_before} of one apply_memit_to_model call, then restored."""
    model, tok = s["mt"].model, s["mt"].tokenizer
    info = {}
    _, orig = apply_memit_to_model(model, tok, reqs, hp or s["hp"], return_orig_weights=True, backend=backend,
                                   return_info=info, **s["kw"], **extra)
    upd = {n: model.get_parameter(n).detach() - w for n, w in orig.items()}
    restore_weights(model, orig)
    return upd, info


@pytest.mark.parametrize("n", [1, 8, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("fam", FAMILIES)
def test_fast_matches_reference(setup, fam, n):
    s = setup[fam]
    before = _params(s["mt"].model)
    reqs = requests(n)
    ref, ref_info = _updates(s, reqs, "reference")
    fast, fast_info = _updates(s, reqs, "fast")
    assert _unchanged(s["mt"].model, before)
    assert sorted(ref) == sorted(fast) == sorted(f"{s['hp'].rewrite_module_tmp.format(l)}.weight" for l in LAYERS)
    for name in ref:
        assert ref[name].norm() > 0
        assert rel(fast[name], ref[name]) < TOL, name
    for a, b in zip(fast_info["z"], ref_info["z"]):
        assert a.steps == b.steps and rel(a.z, b.z) < Z_TOL
    # the update has rank ≤ n and is what the returned factors say
    for name, upd in ref.items():
        assert torch.linalg.matrix_rank(upd.double(), rtol=1e-6) <= n


def test_direct_solve_path_end_to_end(setup, monkeypatch):
    """The fast backend forced to factor λC + KKᵀ (the n ≥ d_k path) gives the same update."""
    s = setup["gpt2"]
    reqs = requests(8)
    ref, _ = _updates(s, reqs, "reference")
    monkeypatch.setattr(get_backend("memit", "fast"), "solve_method", "direct")
    fast, _ = _updates(s, reqs, "fast")
    for name in ref:
        assert rel(fast[name], ref[name]) < TOL


def test_execute_memit_returns_factors_and_leaves_the_model(setup):
    s = setup["llama"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    before = _params(model)
    reqs = requests(3)
    deltas = execute_memit(model, tok, reqs, hp, **s["kw"])
    assert _unchanged(model, before)
    upd, _ = _updates(s, reqs, "reference")
    for name, (X, R) in deltas.items():
        assert X.dtype == R.dtype == torch.float64 and X.shape[1] == R.shape[1] == 3
        assert rel(upd[name], (R @ X.T).float()) < 1e-6  # Linear: ΔW = R Xᵀ (out, in)
    # the edit moves the bare prompts' residual at the z layer to z (up to the λ-weighted fit)
    assert model.get_parameter(next(iter(deltas))).shape == (64, 256)


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_batched_z_equals_one_by_one(setup, fam, monkeypatch):
    """Requests stop at different iterations (a stop threshold the tiny models' losses cross at
    different steps) and hit the clamp: the batched z, the batched z one request per group, and
    the reference's compute_z agree, step counts and loss curves included."""
    import importlib
    compute_v = importlib.import_module("rome_fast.edit.compute_v")
    s = setup[fam]
    model, tok = s["mt"].model, s["mt"].tokenizer
    hp = dataclasses.replace(s["hp"], v_lr=1.5, v_num_grad_steps=10)
    reqs = [normalize_request(r) for r in requests(6)]
    templates = s["kw"]["context_templates"]
    curves = [[sum(x) for x in z.losses] for z in compute_zs(model, tok, reqs, hp, templates)]
    # a threshold that one request's falling loss crosses between steps 4 and 5 (the others start
    # below it, stopping at once, or never reach it), away from every loss value: rounding must
    # not decide whether a request stops
    c = max(curves, key=lambda c: c[3] - c[6])
    threshold = (c[4] + c[5]) / 2
    assert min(abs(v - threshold) for c in curves for v in c) > 1e-4 * threshold
    monkeypatch.setattr(compute_v, "STOP_LOSS", threshold)
    together = compute_zs(model, tok, reqs, hp, templates)
    alone = compute_zs(model, tok, reqs, hp, templates, z_batch=1)
    ref = [compute_z(model, tok, r, hp, hp.z_layer, templates, return_info=True)[1] for r in reqs]
    steps = [z.steps for z in ref]
    assert len(set(steps)) > 1 and 5 in steps, f"requests should stop at different steps: {steps}"
    clamped = 0
    for a, b, c in zip(together, alone, ref):
        assert a.steps == b.steps == c.steps
        assert len(a.losses) == len(b.losses) == len(c.losses) == min(c.steps + 1, hp.v_num_grad_steps)
        assert rel(a.z, c.z) < TOL and rel(b.z, c.z) < TOL and rel(a.h_init, c.h_init) < 1e-5
        bound = hp.clamp_norm_factor * float(a.h_init.norm())
        assert float(a.delta.norm()) <= bound * (1 + 1e-5)
        clamped += float(a.delta.norm()) > bound * (1 - 1e-5)
        for x, y in zip(a.losses, c.losses):
            assert x == pytest.approx(y, rel=1e-3, abs=1e-5)
    assert clamped > 0, "the clamp should be active for some request"


@pytest.mark.parametrize("n", [5, 40])
def test_solve_paths_equal_a_direct_fp64_solve(n):
    d = 32
    g = torch.Generator().manual_seed(n)
    A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    C = (A @ A.T / (3 * d)).float()                    # a mean second moment, fp32 as stored
    K = torch.randn(d, n, generator=g, dtype=torch.float64)
    lam = 3.0
    want = torch.linalg.solve(lam * C.double() + K @ K.T, K)
    fac = CovarianceFactor(C)
    for method in ("auto", "woodbury", "direct"):
        got = solve(fac, K, lam, method)
        assert got.dtype == torch.float64
        assert rel(got, want) < 1e-10, method
    assert rel(solve_reference(C, K, lam), want) < 1e-12


def test_singular_systems_are_refused():
    C = torch.eye(8)
    K = torch.randn(8, 3, dtype=torch.float64)
    for fn in (lambda: solve(CovarianceFactor(C), K, 0.0), lambda: solve_reference(C, K, 0.0)):
        with pytest.raises(SingularSystemError, match="λ"):
            fn()
    # rank-deficient statistics: C singular, λ > 0, fewer edits than the key width
    C1 = torch.zeros(8, 8)
    C1[0, 0] = 1.0
    with pytest.raises(ValueError, match="singular"):
        solve_reference(C1, K, 1.0)


def test_restore_is_bitwise_and_copy_leaves_the_original(setup):
    s = setup["gptj"]
    model, tok, hp = s["mt"].model, s["mt"].tokenizer, s["hp"]
    before = _params(model)
    reqs = requests(4)
    _, orig = apply_memit_to_model(model, tok, reqs, hp, return_orig_weights=True, **s["kw"])
    assert set(orig) == {f"transformer.h.{l}.mlp.fc_out.weight" for l in LAYERS}
    assert not _unchanged(model, before)
    restore_weights(model, orig)
    assert _unchanged(model, before)
    edited, none = apply_memit_to_model(model, tok, reqs, hp, copy=True, **s["kw"])
    assert none == {} and edited is not model and _unchanged(model, before)
    # compute() (the reference's execute contract) leaves the model bitwise as it was
    get_backend("memit", "fast").compute(model, tok, reqs, hp, **s["kw"])
    assert _unchanged(model, before)


# ---- bad input: a clear error, weights untouched ----------------------------------------------
def _refused(s, reqs, hp, match, **kw):
    model = s["mt"].model
    before = _params(model)
    for backend in ("fast", "reference"):
        with pytest.raises(ValueError, match=match):
            apply_memit_to_model(model, s["mt"].tokenizer, reqs, hp, backend=backend, **{**s["kw"], **kw})
        assert _unchanged(model, before)


def test_bad_input(setup, tmp_path):
    s = setup["llama"]
    hp = s["hp"]
    _refused(s, [], hp, "no requests")
    _refused(s, requests(2), dataclasses.replace(hp, layers=[1, 7]), r"layer\(s\) \[7\].*outside the model's 4")
    clash = requests(2) + [dict(requests(1)[0], target_new={"str": " Tokyo"})]
    _refused(s, clash, hp, "requests 0 and 2 conflict")
    _refused(s, requests(3), dataclasses.replace(hp, mom2_update_weight=0.0), r"λ\) = 0 makes .*singular")
    d_k = 256
    _refused(s, requests(2), hp, r"no statistics for edited layer\(s\) \[2\]", cov={1: torch.eye(d_k)})
    _refused(s, requests(2), hp, "layer 2 have shape .*C must be 256x256",
             cov={1: torch.eye(d_k), 2: torch.eye(d_k - 1)})
    # a statistics file of the wrong width for one layer, in the cache the edit reads
    good = layer_stats(s["mt"].model, s["mt"].tokenizer, hp.rewrite_module_tmp.format(1), tmp_path, "corpus",
                       sample_size=300, corpus=s["kw"]["corpus"], progress=False)
    (good.path.parent / good.path.name.replace("layers.1.", "layers.2.")).write_bytes(_resized_stats(good.path, 100))
    _refused(s, requests(2), hp, "is 100x100 but the layer's key width is 256", stats_dir=tmp_path)
    with pytest.raises(ValueError, match="strictly ascending"):
        dataclasses.replace(hp, layers=[2, 1])
    with pytest.raises(ValueError, match="λ"):
        dataclasses.replace(hp, mom2_update_weight=-1.0)


def test_in_memory_statistics_are_checked_like_files(setup):
    """An in-memory corpus (no statistics file) gets the file path's checks: too few keys for the
    key width is refused with the fix, and mom2_ridge regularises it instead."""
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    before = _params(model)
    few = ["tiny corpus", "of two texts"]
    hp = dataclasses.replace(s["hp"], mom2_n_samples=None)
    kw = {**s["kw"], "corpus": few, "stats_dir": None}
    with pytest.raises(StatisticsError, match=r"keys for a key width of 256.*mom2_ridge"):
        apply_memit_to_model(model, tok, requests(2), hp, backend="fast", **kw)
    with pytest.raises(StatisticsError, match=r"keys for a key width of 256.*mom2_ridge"):
        apply_memit_to_model(model, tok, requests(2), hp, backend="reference", **kw)
    assert _unchanged(model, before)
    _, orig = apply_memit_to_model(model, tok, requests(2), dataclasses.replace(hp, mom2_ridge=1e-3),
                                   return_orig_weights=True, backend="fast", **kw)
    assert all(bool(torch.isfinite(model.get_parameter(n)).all()) and not torch.equal(model.get_parameter(n), w)
               for n, w in orig.items())
    restore_weights(model, orig)
    assert _unchanged(model, before)


def test_z_step_resumes_from_its_checkpoint(setup, tmp_path, monkeypatch):
    """A z step cut short (Ctrl-C after its first group) and run again computes only the groups
    its checkpoint lacks, and gives the uninterrupted run's update; a checkpoint of another edit
    is refused."""
    from rome_fast.edit.memit import fast_z
    s = setup["llama"]
    model = s["mt"].model
    before = _params(model)
    reqs = requests(6)
    full, _ = _updates(s, reqs, "fast", z_batch=2)
    calls = FailOnCall(monkeypatch, fast_z, "_optimise_group", at=2)
    folder = tmp_path / "z"
    with pytest.raises(KeyboardInterrupt):
        _updates(s, reqs, "fast", z_batch=2, z_checkpoint=folder)
    assert _unchanged(model, before) and len(list(folder.glob("z_*.safetensors"))) == 1
    calls.at, calls.calls = None, 0
    resumed, info = _updates(s, reqs, "fast", z_batch=2, z_checkpoint=folder)
    assert calls.calls == 2 and info["seconds"]["z_resumed"] > 0
    assert sorted(resumed) == sorted(full) and all(rel(resumed[n], full[n]) < 1e-5 for n in full)
    # done: a third call reads every vector
    calls.calls = 0
    again, _ = _updates(s, reqs, "fast", z_batch=2, z_checkpoint=folder)
    assert calls.calls == 0 and all(torch.equal(again[n], resumed[n]) for n in full)
    with pytest.raises(ValueError, match="holds target vectors of another edit .*hparams"):
        _updates(s, reqs, "fast", dataclasses.replace(s["hp"], v_lr=0.1), z_checkpoint=folder)
    assert _unchanged(model, before)


def test_module_names_default_to_the_adapters_and_are_checked(setup):
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    names = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
             "lm_head_module")
    bare = dataclasses.replace(s["hp"], **dict.fromkeys(names))  # null: the model's own modules
    assert all(k not in bare.to_dict() for k in names)
    before = _params(model)
    _, a = apply_memit_to_model(model, tok, requests(2), bare, return_orig_weights=True, **s["kw"])
    upd_bare = {n: model.get_parameter(n) - w for n, w in a.items()}
    restore_weights(model, a)
    _, b = apply_memit_to_model(model, tok, requests(2), s["hp"], return_orig_weights=True, **s["kw"])
    assert all(torch.equal(model.get_parameter(n) - w, upd_bare[n]) for n, w in b.items())
    restore_weights(model, b)
    assert _unchanged(model, before)
    wrong = dataclasses.replace(s["hp"], rewrite_module_tmp="model.layers.{}.mlp.up_proj")
    _refused(s, requests(2), wrong, r"hparams.rewrite_module_tmp names 'model.layers.1.mlp.up_proj'")


def _resized_stats(path, d):
    """A statistics file like `path` but with a d×d second moment."""
    import io

    import numpy as np
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data["mom2.mom2"] = np.eye(d, dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, **data)
    return buf.getvalue()


def test_interrupt_mid_edit_restores(setup, monkeypatch):
    """Ctrl-C after the first layer's update is in the model: the weights come back."""
    s = setup["gpt_neox"]
    model = s["mt"].model
    before = _params(model)
    from rome_fast.edit.memit import fast as fast_module
    calls = FailOnCall(monkeypatch, fast_module, "solve", at=2)
    with pytest.raises(KeyboardInterrupt):
        apply_memit_to_model(model, s["mt"].tokenizer, requests(3), s["hp"], **s["kw"])
    assert calls.calls == 2 and _unchanged(model, before)


# ---- hyperparameters ----------------------------------------------------------------------------
def test_presets_and_reference_files(tmp_path):
    assert set(list_presets()) == {"gpt2-xl", "EleutherAI_gpt-j-6B", "Meta-Llama-3-8B", "SmolLM2-135M"}
    xl = MEMITHyperParams.from_name("openai-community/gpt2-xl")
    assert (xl.layers, xl.mom2_update_weight, xl.v_num_grad_steps, xl.clamp_norm_factor) == ([13, 14, 15, 16, 17],
                                                                                          20000, 20, 0.75)
    gptj = MEMITHyperParams.from_name("EleutherAI/gpt-j-6B")
    assert gptj.layers == [3, 4, 5, 6, 7, 8] and gptj.rewrite_module_tmp == "transformer.h.{}.mlp.fc_out"
    for name in ("meta-llama/Meta-Llama-3-8B-Instruct", "Llama-3-8B", "llama3-8b"):
        assert MEMITHyperParams.from_name(name).v_lr == 0.1
    assert MEMITHyperParams.from_name("smollm2-135m").rewrite_module_tmp == "model.layers.{}.mlp.down_proj"
    # every bundled file holds exactly the reference's fields
    ref_fields = {"layers", "layer_selection", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer",
                  "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_adjustment", "mom2_update_weight",
                  "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                  "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype"}
    for p in PRESET_DIR.glob("*.json"):
        assert set(json.loads(p.read_text())) == ref_fields, p
    # AlphaEdit's copies add model_name: read; a typo is refused
    data = dict(json.loads((PRESET_DIR / "Meta-Llama-3-8B.json").read_text()), model_name="Llama3-8B")
    (tmp_path / "a.json").write_text(json.dumps(data))
    hp = MEMITHyperParams.from_json(tmp_path / "a.json")
    assert hp.model_name == "Llama3-8B" and hp.to_dict()["model_name"] == "Llama3-8B"
    (tmp_path / "b.json").write_text(json.dumps(dict(data, mom2_update_wieght=1)))
    with pytest.raises(ValueError, match="mom2_update_wieght"):
        MEMITHyperParams.from_json(tmp_path / "b.json")
    hp.to_json(tmp_path / "c.json")
    assert MEMITHyperParams.from_json(tmp_path / "c.json") == hp
    with pytest.raises(ValueError, match="no MEMIT preset"):
        MEMITHyperParams.from_name("gpt-nonexistent")


def test_gpu_benchmark_quick_mode(tmp_path):
    """The GPU suite's entry point runs (a tiny GPT-J on the CPU) and the fast rows agree with the
    reference row."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memit_gpu.py"
    spec = importlib.util.spec_from_file_location("memit_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["edits"], r["backend"]) for r in rows] == [(8, "fast"), (8, "reference"), (16, "fast")]
    assert rows[1]["rel_diff_update_max"] < TOL
    assert all(set(r["seconds"]) == {"setup", "z", "layers", "total"} for r in rows)


def test_cli_edit_memit(setup, tmp_path, capsys):
    """rome-fast edit --method memit --requests FILE on a tiny model: before/after, and the saved
    changes are the update."""
    from safetensors.torch import load_file

    from rome_fast.cli import main
    s = setup["llama"]
    (tmp_path / "reqs.json").write_text(json.dumps(requests(3)))
    s["hp"].to_json(tmp_path / "hp.json")
    (tmp_path / "corpus.txt").write_text("\n\n".join(s["kw"]["corpus"]))
    argv = ["edit", "--model", "tiny:llama", "--method", "memit", "--requests", str(tmp_path / "reqs.json"),
            "--hparams", str(tmp_path / "hp.json"), "--corpus", str(tmp_path / "corpus.txt"),
            "--stats-dir", str(tmp_path / "stats"), "--save-delta", str(tmp_path / "delta.safetensors")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "edited 3 fact(s)" in out
    delta = load_file(str(tmp_path / "delta.safetensors"))
    assert sorted(delta) == [f"model.layers.{l}.mlp.down_proj.weight" for l in LAYERS]
    assert all(t.norm() > 0 for t in delta.values())
    assert main(["edit", "--model", "tiny:llama", "--method", "memit", "--prompt", "{} is", "--subject", "x",
                 "--target", "y"]) == 2
    assert "--requests FILE" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "no subject slot", "subject": "x",
                                                   "target_new": "y"}]))
    assert main(["edit", "--model", "tiny:llama", "--method", "memit", "--requests", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: request 0: " in capsys.readouterr().err
