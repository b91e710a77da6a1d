"""AlphaEdit on tiny random models: the null-space projection (annihilates the preserved keys, is
an idempotent symmetric projector, the fast basis spans the reference's P), fast = reference after
three sequential batches on two families, updates inside P's range, bad input and interrupts
leaving weights and accumulated keys as they were, and the hyperparameter presets."""
import dataclasses

import pytest
import torch

from rome_fast.edit.alphaedit import (AlphaEditHyperParams, StatisticsError, apply_alphaedit_to_model,
                                      list_presets, null_space, projection_reference)
from rome_fast.edit.alphaedit import fast as alpha_fast, main as alpha_main
from rome_fast.edit.fast_stats import layer_stats_fast
from rome_fast.edit.memit import MEMITHyperParams, get_context_templates
from rome_fast.edit.stats import corpus_ds_name
from rome_fast.models.random_init import random_texts

from test_memit import rel, requests

FAMILIES = ["llama", "gpt2"]
LAYERS = [1, 2]
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Per family: model, statistics of the edited layers (written once), their moments, and
    hparams whose threshold keeps about half of the directions (the tiny models' scale)."""
    corpus = list(random_texts())
    out = {}
    for fam in FAMILIES:
        mt = tiny_models[fam]
        base = MEMITHyperParams.for_model(mt.model, layers=LAYERS)
        stats_dir = tmp_path_factory.mktemp(f"alpha-stats-{fam}")
        st = layer_stats_fast(mt.model, mt.tokenizer, [mt.adapter.rewrite_name(l) for l in LAYERS],
                              stats_dir, corpus_ds_name(corpus), sample_size=300, corpus=corpus, progress=False)
        moments = {l: st[mt.adapter.rewrite_name(l)].mom2 for l in LAYERS}
        hp = AlphaEditHyperParams(**{**base.to_dict(), "v_num_grad_steps": 6, "mom2_n_samples": 300,
                                     "mom2_dataset": "synthetic", "nullspace_threshold": _threshold(moments)})
        out[fam] = dict(mt=mt, hp=hp, moments=moments, corpus=corpus,
                        kw=dict(context_templates=get_context_templates(mt.model, mt.tokenizer, seed=0),
                                stats_dir=stats_dir, corpus=corpus, progress=False))
    return out


def _threshold(moments) -> float:
    """A threshold in the middle of the spectrum, in the widest gap common to every layer's
    eigenvalues: the fp32 decompositions (reference SVD, fast eigh) then agree on the null space
    to ~ε·λ_max/gap, and rounding cannot move an eigenvalue across it."""
    spectra = [torch.linalg.eigvalsh(m.moment().double()) for m in moments.values()]
    S = spectra[0]
    n = len(S)
    cands = [(S[i] + S[i + 1]) / 2 for i in range(n // 4, 3 * n // 4)]
    return float(max(cands, key=lambda t: min(float((sp - t).abs().min()) for sp in spectra)))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _sequential(s, backend, batches=3, per_batch=4, hp=None):
    """{weight: W_final − W_0} and the accumulated keys after `batches` sequential batches; the
    model is restored afterwards."""
    model, tok = s["mt"].model, s["mt"].tokenizer
    W0 = _params(model)
    cache, reqs = {}, requests(batches * per_batch)
    try:
        for b in range(batches):
            apply_alphaedit_to_model(model, tok, reqs[b * per_batch:(b + 1) * per_batch], hp or s["hp"],
                                     cache_c=cache, backend=backend, **s["kw"])
        upd = {n: (p.detach() - W0[n]).clone() for n, p in model.named_parameters() if not torch.equal(p, W0[n])}
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(W0[n])
    return upd, cache


def test_projection_annihilates_the_preserved_keys_and_is_a_projector(setup):
    s = setup["llama"]
    t = s["hp"].nullspace_threshold
    for layer, mom in s["moments"].items():
        C = mom.moment().float()
        P = projection_reference(C, t, mom.count)
        r = round(float(P.diagonal().sum()))
        assert 0 < r < C.shape[0]
        assert float((P @ P - P).abs().max()) < 1e-5 and float((P - P.T).abs().max()) < 1e-6
        # the mean of ‖P k₀‖² over the statistics' own keys is trace(PC): below r · threshold
        assert float(torch.trace(P.double() @ C.double())) < r * t * (1 + 1e-4)
        # keys drawn from the statistics' distribution (k₀ ~ N(0, C)) lose almost everything
        S, V = torch.linalg.eigh(C.double())
        K0 = V @ (S.clamp(min=0).sqrt()[:, None] * torch.randn(C.shape[0], 4000, generator=torch.Generator()
                                                              .manual_seed(layer), dtype=torch.float64))
        PK0 = P.double() @ K0
        assert float(PK0.pow(2).sum(0).mean()) < 1.2 * r * t
        kept = float(S[S < t].sum() / S.sum())      # the share of the keys' energy P lets through
        assert float(PK0.pow(2).sum() / K0.pow(2).sum()) == pytest.approx(kept, rel=0.1)
        # the fast path's basis spans the same space
        ns = null_space(C, t, mom.count)
        assert ns.rank == r and rel(ns.matrix(), P) < 1e-4
    # a spectrum with a gap (the preserved keys span half the space): P·K₀ ≈ 0
    g = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.linspace(0.5, 5, 48), torch.full((48,), 1e-7)]).double()
    C = (V * lam) @ V.T
    K0 = (V * lam.sqrt()) @ torch.randn(96, 2000, generator=g, dtype=torch.float64)
    for P in (projection_reference(C, 2e-2, count=10_000), null_space(C, 2e-2, count=10_000).matrix()):
        assert round(float(P.diagonal().sum())) == 48
        assert float((P.double() @ K0).norm() / K0.norm()) < 1e-3
        assert float((P @ P - P).abs().max()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_fast_matches_reference_after_three_sequential_batches(setup, fam):
    s = setup[fam]
    ref, ref_cache = _sequential(s, "reference")
    fast, fast_cache = _sequential(s, "fast")
    assert sorted(ref) == sorted(fast) == sorted(s["mt"].adapter.rewrite_weight_name(l) for l in LAYERS)
    for n in ref:
        assert ref[n].norm() > 0
        assert rel(fast[n], ref[n]) < TOL, n
    for l in LAYERS:
        assert rel(fast_cache[l], ref_cache[l]) < TOL
        assert ref_cache[l].norm() > 0


def test_fast_backend_is_reentrant(setup, monkeypatch):
    """A call that starts while another is running (a callback, a thread) keeps its own K_p cache
    and null spaces: both give what they give alone."""
    a, b = setup["llama"], setup["gpt2"]
    alone_a, cache_a = _sequential(a, "fast", batches=2)
    alone_b, cache_b = _sequential(b, "fast", batches=1)
    real, inner = alpha_fast.layer_null_spaces, {}

    def nested(*args, **kw):
        if not inner:  # the outer call, between its setup and its solves, runs a whole other edit
            inner["started"] = True
            inner["result"] = _sequential(b, "fast", batches=1)
        return real(*args, **kw)

    monkeypatch.setattr(alpha_fast, "layer_null_spaces", nested)
    got_a, got_cache_a = _sequential(a, "fast", batches=2)
    got_b, got_cache_b = inner["result"]
    for got, alone, got_c, alone_c in ((got_a, alone_a, got_cache_a, cache_a), (got_b, alone_b, got_cache_b, cache_b)):
        assert sorted(got) == sorted(alone)
        assert all(rel(got[n], alone[n]) < 1e-6 for n in alone)
        assert all(rel(got_c[l], alone_c[l]) < 1e-6 for l in LAYERS)


def test_updates_stay_in_the_null_space(setup):
    """ΔW = ΔW·P: nothing of the update reaches the preserved keys' directions."""
    s = setup["gpt2"]   # Conv1D layout: the update is [d_k, d_v], P acts on its rows
    upd, _ = _sequential(s, "fast", batches=1)
    for l in LAYERS:
        name = s["mt"].adapter.rewrite_weight_name(l)
        m = s["moments"][l]   # (with its token count, as the backends read it from the file)
        P = projection_reference(m.moment(), s["hp"].nullspace_threshold, count=m.count).double()
        D = upd[name].double()
        D = D if D.shape[1] == P.shape[0] else D.T       # as [d_v, d_k]
        assert float((D - D @ P).norm() / D.norm()) < 1e-4


def test_bad_input_leaves_weights_and_cache(setup, tmp_path):
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    before = _params(model)
    cache = {l: torch.eye(s["moments"][l].mom2.shape[0]) for l in LAYERS}
    kept = dict(cache)
    reqs = requests(2)
    for backend in ("reference", "fast"):
        # a threshold below every eigenvalue keeps no direction
        hp = dataclasses.replace(s["hp"], nullspace_threshold=1e-30)
        with pytest.raises(StatisticsError, match="keeps no direction"):
            apply_alphaedit_to_model(model, tok, reqs, hp, cache_c=cache, backend=backend, **s["kw"])
        # statistics from fewer tokens than the key width
        few = ["tiny corpus", "of two texts"]
        kw = {**s["kw"], "corpus": few, "stats_dir": tmp_path / backend}
        with pytest.raises(StatisticsError, match="fewer than the key width"):
            apply_alphaedit_to_model(model, tok, reqs, dataclasses.replace(s["hp"], mom2_n_samples=None),
                                     cache_c=cache, backend=backend, **kw)
        # accumulated keys of another width
        with pytest.raises(ValueError, match="another model or layer"):
            apply_alphaedit_to_model(model, tok, reqs, s["hp"], cache_c={LAYERS[0]: torch.zeros(3, 3)},
                                     backend=backend, **s["kw"])
        assert _unchanged(model, before)
        assert cache == kept and all(c is kept[l] for l, c in cache.items())
    with pytest.raises(ValueError, match="nullspace_threshold"):
        dataclasses.replace(s["hp"], nullspace_threshold=-1.0)
    with pytest.raises(ValueError, match="L2"):
        dataclasses.replace(s["hp"], L2=0)
    with pytest.raises(TypeError, match="AlphaEditHyperParams"):
        apply_alphaedit_to_model(model, tok, reqs, MEMITHyperParams(**{k: v for k, v in s["hp"].to_dict().items()
                                                                       if k not in ("nullspace_threshold", "L2")}))
    # a given C of rank below the key width
    d = s["moments"][LAYERS[0]].mom2.shape[0]
    low = torch.randn(d, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(StatisticsError, match="rank 3"):
        null_space(low @ low.T, 1.0)


def test_interrupt_after_the_updates_restores_weights_and_cache(setup, monkeypatch):
    s = setup["llama"]
    model, tok = s["mt"].model, s["mt"].tokenizer
    before = _params(model)
    cache = {}
    apply_alphaedit_to_model(model, tok, requests(2), s["hp"], cache_c=cache, backend="fast", **s["kw"])
    edited, kept = _params(model), dict(cache)

    real = alpha_main.accumulate_keys

    def late(*a, **k):  # Ctrl-C once every layer is updated and the keys are accumulated
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(alpha_main, "accumulate_keys", late)
    monkeypatch.setattr(alpha_fast, "accumulate_keys", late)
    for backend in ("reference", "fast"):
        with pytest.raises(KeyboardInterrupt):
            apply_alphaedit_to_model(model, tok, requests(4)[2:], s["hp"], cache_c=cache, backend=backend,
                                     **s["kw"])
        assert _unchanged(model, edited) and cache == kept
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])


def test_presets():
    assert list_presets() == ["EleutherAI_gpt-j-6B", "Meta-Llama-3-8B", "SmolLM2-135M", "gpt2-xl"]
    for name, memit_name in [("gpt2-xl", "gpt2-xl"), ("EleutherAI/gpt-j-6B", "EleutherAI/gpt-j-6B"),
                             ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b"), ("smollm2-135m", "smollm2")]:
        hp, mp = AlphaEditHyperParams.from_name(name), MEMITHyperParams.from_name(memit_name)
        assert hp.nullspace_threshold == 2e-2 and hp.L2 == 10
        assert {k: v for k, v in hp.to_dict().items() if k not in ("nullspace_threshold", "L2", "model_name")} == \
            {k: v for k, v in mp.to_dict().items() if k != "model_name"}


@pytest.mark.slow
def test_cli_edit_and_eval_alphaedit(setup, tmp_path, capsys):
    """rome-fast edit --method alphaedit (one batch, the saved delta is the update) and a
    two-batch sequential eval with the collapse monitor, on a tiny model."""
    import json

    from safetensors.torch import load_file

    from rome_fast.cli import main
    from cf_cases import COMPACT_CASES
    s = setup["llama"]
    (tmp_path / "reqs.json").write_text(json.dumps(requests(3)))
    dataclasses.replace(s["hp"], nullspace_threshold=1e9).to_json(tmp_path / "hp.json")
    (tmp_path / "corpus.txt").write_text("\n\n".join(s["corpus"]))
    common = ["--model", "tiny:llama", "--hparams", str(tmp_path / "hp.json"), "--corpus", str(tmp_path / "corpus.txt"),
              "--stats-dir", str(tmp_path / "stats")]
    assert main(["edit", "--method", "alphaedit", "--requests", str(tmp_path / "reqs.json"),
                 "--save-delta", str(tmp_path / "delta.safetensors"), *common]) == 0
    assert "edited 3 fact(s)" in capsys.readouterr().out
    delta = load_file(str(tmp_path / "delta.safetensors"))
    assert sorted(delta) == [f"model.layers.{l}.mlp.down_proj.weight" for l in LAYERS]
    assert all(t.norm() > 0 for t in delta.values())
    (tmp_path / "cf.json").write_text(json.dumps(COMPACT_CASES))
    assert main(["eval", "--method", "alphaedit", "--num-edits", "2", "--sequential", "--skip-generation",
                 "--data", str(tmp_path / "cf.json"), "--out", str(tmp_path / "run"), "--quiet", *common]) == 0
    mon = json.loads((tmp_path / "run" / "monitor.json").read_text())
    assert [b["edits"] for b in mon["batches"]] == [2, 4]
    assert len(list((tmp_path / "run").glob("case_*.json"))) == 4
    # bad input: a threshold that keeps no direction, one line
    dataclasses.replace(s["hp"], nullspace_threshold=1e-30).to_json(tmp_path / "hp0.json")
    common[3] = str(tmp_path / "hp0.json")
    assert main(["edit", "--method", "alphaedit", "--requests", str(tmp_path / "reqs.json"), *common]) == 2
    assert "keeps no direction" in capsys.readouterr().err
