"""The fast paths against the reference paths on a CUDA GPU, with the compiled CUDA core (tiny random
models of each family, strict fp32): trace scores within 1e-4, edited weights within 1e-4 relative,
statistics within 1e-5 relative. The same comparisons on CPU are in test_trace_engine.py and
test_edit_fast.py; these run where `pytest -m cuda` finds a GPU (benchmarks/gpu_suite.sh)."""
import dataclasses

import pytest
import torch

from rome_fast import _ext
from rome_fast.models import ModelAndTokenizer
from rome_fast.models.random_init import RANDOM_FAMILIES, random_model, random_texts
from rome_fast.tokens import find_token_range

pytestmark = pytest.mark.cuda

FACTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
         ("Miles Davis plays the", "Miles Davis"),
         ("The official language of Brazil", "Brazil")]
REQS = [
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": " football"}},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": " English"}},
    {"prompt": "{} is headquartered in", "subject": "Toyota", "target_new": {"str": " Germany"}},
]


@pytest.fixture(autouse=True)
def strict_fp32():
    """TF32 off, as the reference runs (and the 1e-4 promise is made)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _mt(family, device="cuda"):
    model, tok = random_model(family, seed=3, device=device)
    return ModelAndTokenizer(model=model, tokenizer=tok)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def test_the_cuda_core_is_loaded():
    """The suite builds the CUDA kernels first: every op below must run them, not the fallbacks."""
    info = _ext.backend_info()
    assert info["cuda_ext"], info
    x = torch.randn(3, 4, 8, device="cuda")
    assert _ext.native_for(x)


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_trace_engine_equals_reference_on_cuda(family):
    from rome_fast.trace.api import calculate_hidden_flow
    from rome_fast.trace.engine import FactInput, TraceEngine
    from rome_fast.trace.noise import draw_noise
    mt = _mt(family)
    facts = []
    for prompt, subject in FACTS:
        ids = mt.tokenizer.encode(prompt)
        b, e = find_token_range(mt.tokenizer, ids, subject)
        facts.append(FactInput(ids, (b, e), draw_noise(4, e - b, mt.adapter.hidden_size, 0.6)))
    got = TraceEngine(mt).trace(facts, kinds=("hidden", "mlp", "attn"), window=3)
    spread = 0.0
    for (prompt, subject), res in zip(FACTS, got):
        for kind, name in ((None, "hidden"), ("mlp", "mlp"), ("attn", "attn")):
            ref = calculate_hidden_flow(mt, prompt, subject, samples=4, noise=0.6, window=3, kind=kind,
                                        backend="reference")
            assert res.high_score == pytest.approx(ref["high_score"], abs=1e-5)
            assert res.low_score == pytest.approx(ref["low_score"], abs=1e-5)
            torch.testing.assert_close(res.scores[name].cpu(), ref["scores"].float().cpu(), rtol=0, atol=1e-4)
            spread = max(spread, float(ref["scores"].max() - ref["scores"].min()))
    assert spread > 1e-3, "the model must show restoration effects for the comparison to mean anything"


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D (in_out) and Linear (out_in) weights
def test_rome_fast_equals_reference_on_cuda(family, tmp_path):
    from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, get_context_templates, layer_stats, \
        restore_weights
    from rome_fast.edit.compute_u import clear_cache
    from rome_fast.edit.solve_update import clear_factor_cache
    mt = _mt(family)
    model, tok = mt.model, mt.tokenizer
    hp = dataclasses.replace(ROMEHyperParams.for_model(model, layer=1), v_num_grad_steps=6, mom2_n_samples=300,
                             mom2_dataset="synthetic", context_template_length_params=[[4, 3], [6, 2]])
    templates = get_context_templates(model, tok, hp.context_template_length_params, seed=0)
    corpus = random_texts()
    layer_stats(model, tok, hp.rewrite_module_tmp.format(1), tmp_path, "corpus", sample_size=300, corpus=corpus,
                progress=False)
    kw = dict(context_templates=templates, stats_dir=tmp_path, corpus=corpus, progress=False)
    W = model.get_parameter(hp.rewrite_module_tmp.format(1) + ".weight")
    W0 = W.detach().clone()
    after = {}
    for backend in ("reference", "fast"):
        clear_cache(), clear_factor_cache()
        _, orig = apply_rome_to_model(model, tok, REQS, hp, return_orig_weights=True, backend=backend, **kw)
        after[backend] = W.detach().clone()
        restore_weights(model, orig)
        assert torch.equal(W, W0), "restore is bitwise"
    upd_ref, upd_fast = after["reference"] - W0, after["fast"] - W0
    assert upd_ref.norm() > 0
    assert rel(upd_fast, upd_ref) < 1e-4
    assert rel(after["fast"], after["reference"]) < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_statistics_equal_reference_on_cuda(family):
    from rome_fast.edit.fast_stats import collect_mom2_fast
    from rome_fast.edit.stats import collect_mom2
    mt = _mt(family)
    model, tok = mt.model, mt.tokenizer
    names = [mt.adapter.rewrite_name(l) for l in (0, 2)]
    texts = random_texts()[:60]
    ref = {n: collect_mom2(model, tok, [n], texts, 1024, 3072, torch.float64, progress=False)[n] for n in names}
    fast = collect_mom2_fast(model, tok, names, texts, 1024, 3072, torch.float64, progress=False, row_tokens=128)
    for n in names:
        assert fast[n].count == ref[n].count
        assert fast[n].mom2.is_cuda
        assert rel(fast[n].mom2, ref[n].mom2) < 1e-5
    bf = collect_mom2_fast(model, tok, names[:1], texts[:20], 1024, 3072, torch.float32, act_dtype="bfloat16",
                           progress=False)[names[0]]
    want = collect_mom2(model, tok, names[:1], texts[:20], 1024, 3072, torch.float32, progress=False)[names[0]]
    # measured at most 9.8e-3 on CPU over the tiny models (tests/test_edit_fast.py); not yet
    # measured on a GPU, whose bf16 matmuls also sum in fp32
    assert rel(bf.mom2, want.mom2) < 2e-2
