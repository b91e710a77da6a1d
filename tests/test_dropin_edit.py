"""Editing through rome_fast.compat (rome, util.nethook, dsets, experiments.py.demo) behaves as the
reference's modules: statistics from STATS_DIR with no corpus, layer_stats' float64 default and
download=, the offline error that says what to do, the helper functions, the data sets."""
import dataclasses
import json

import pytest
import torch

import importlib

from rome_fast.compat import dsets, rome
from rome_fast.compat.experiments.py import demo
from rome_fast.compat.util import globals as cglobals
from rome_fast.compat.util import nethook
from rome_fast.edit import StatisticsError, clear_caches
from rome_fast.edit import apply_rome_to_model as core_apply
from rome_fast.edit import layer_stats as core_layer_stats
from rome_fast.models.random_init import random_texts

compat_stats = importlib.import_module("rome_fast.compat.rome.layer_stats")
LAYER = 1
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}}


@pytest.fixture(scope="module")
def mt(tiny_model):
    return tiny_model("gpt2", seed=1)


@pytest.fixture
def hp(mt):
    return dataclasses.replace(rome.ROMEHyperParams.for_model(mt.model, layer=LAYER), v_num_grad_steps=4,
                               mom2_n_samples=200)


@pytest.fixture
def stats_dir(tmp_path, monkeypatch):
    """An empty STATS_DIR, no corpus in the environment, no download."""
    monkeypatch.setattr(cglobals, "STATS_DIR", tmp_path / "stats")
    monkeypatch.delenv("ROME_FAST_CORPUS", raising=False)
    monkeypatch.setattr(compat_stats, "download_stats", lambda path, root: False)
    clear_caches()
    yield tmp_path / "stats"
    clear_caches()


def _reference_layout_file(mt, hp, stats_dir):
    """The statistics as the reference would leave them in STATS_DIR (its name, 'wikipedia')."""
    name = mt.adapter.rewrite_name(LAYER)
    core_layer_stats(mt.model, mt.tokenizer, name, stats_dir, "wikipedia", sample_size=hp.mom2_n_samples,
                     corpus=random_texts(hp.mom2_n_samples), progress=False)
    return compat_stats.stats_file(mt.model, name, "wikipedia", hp.mom2_n_samples, "float32", stats_dir)


def test_offline_without_statistics_says_what_to_do(mt, hp, stats_dir):
    before = mt.model.get_parameter(mt.adapter.rewrite_name(LAYER) + ".weight").clone()
    expected = compat_stats.stats_file(mt.model, mt.adapter.rewrite_name(LAYER), "wikipedia", 200, "float32")
    with pytest.raises(StatisticsError) as err:
        rome.apply_rome_to_model(mt.model, mt.tokenizer, [REQUEST], hp)
    msg = str(err.value)
    assert str(expected) in msg and "ROME_FAST_CORPUS" in msg and "\n" not in msg
    assert torch.equal(mt.model.get_parameter(mt.adapter.rewrite_name(LAYER) + ".weight"), before)


def test_reference_statistics_file_needs_no_corpus(mt, hp, stats_dir):
    path = _reference_layout_file(mt, hp, stats_dir)
    assert path.is_file() and path.parent.name == "wikipedia_stats"
    w = mt.adapter.rewrite_name(LAYER) + ".weight"
    before = mt.model.get_parameter(w).detach().clone()
    model, orig = rome.apply_rome_to_model(mt.model, mt.tokenizer, [REQUEST], hp, return_orig_weights=True)
    ours = model.get_parameter(w).detach().clone()
    assert torch.equal(orig[w], before) and not torch.equal(ours, before)
    model.get_parameter(w).data.copy_(before)
    # the same edit through rome_fast's own API, told where the statistics are
    clear_caches()
    core_apply(mt.model, mt.tokenizer, [REQUEST], hp, stats_dir=stats_dir)
    torch.testing.assert_close(mt.model.get_parameter(w).detach(), ours, rtol=0, atol=0)
    mt.model.get_parameter(w).data.copy_(before)
    # get_inv_cov as the reference calls it: C⁻¹ of that file
    inv = rome.get_inv_cov(mt.model, mt.tokenizer, mt.adapter.rewrite_name(LAYER), "wikipedia", 200, "float32")
    from rome_fast.edit.stats import load_stats_file
    C = load_stats_file(path, sample_size=200).moment().float()
    # against C⁻¹ in fp64 (an ill-conditioned C makes inv @ C - I large for any fp32 inverse)
    exact = torch.linalg.inv(C.double())
    diff = float((inv.double() - exact).norm() / exact.norm())
    assert diff < 5e-4


def test_execute_rome_leaves_the_model_and_returns_rank_one_factors(mt, hp, stats_dir):
    _reference_layout_file(mt, hp, stats_dir)
    w = mt.adapter.rewrite_name(LAYER) + ".weight"
    before = mt.model.get_parameter(w).detach().clone()
    deltas = rome.execute_rome(mt.model, mt.tokenizer, REQUEST, hp)
    assert list(deltas) == [w] and torch.equal(mt.model.get_parameter(w), before)
    u, right = deltas[w]
    upd = rome.upd_matrix_match_shape(u.unsqueeze(1) @ right.unsqueeze(0), before.shape)
    assert upd.shape == before.shape


def test_layer_stats_defaults_to_float64_and_takes_download(mt, tmp_path, monkeypatch):
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("\n\n".join(random_texts(60)))
    monkeypatch.setenv("ROME_FAST_CORPUS", str(corpus))
    name = mt.adapter.rewrite_name(LAYER)
    calls = []
    monkeypatch.setattr(compat_stats, "download_stats", lambda path, root: calls.append(path) or False)
    stat = compat_stats.layer_stats(mt.model, mt.tokenizer, name, tmp_path / "s", "wiki", ["mom2"], sample_size=50,
                            progress=None)
    assert stat.mom2.moment().dtype == torch.float64
    assert stat.path.name == f"{name}_float64_mom2_50.npz" and stat.path.parent.name == "wiki_stats"
    assert calls == []  # a local corpus: nothing to download
    monkeypatch.delenv("ROME_FAST_CORPUS")
    with pytest.raises(StatisticsError, match="ROME_FAST_CORPUS"):
        compat_stats.layer_stats(mt.model, mt.tokenizer, name, tmp_path / "s", "wikipedia", ["mom2"], sample_size=50,
                         download=True, progress=None)
    assert len(calls) == 1 and calls[0].name == f"{name}_float64_mom2_50.npz"
    with pytest.raises(StatisticsError):
        compat_stats.layer_stats(mt.model, mt.tokenizer, name, tmp_path / "s", "wikipedia", ["mom2"], sample_size=50,
                         download=False, progress=None)
    assert len(calls) == 1


def test_upd_matrix_match_shape():
    m = torch.arange(6.).reshape(2, 3)
    assert rome.upd_matrix_match_shape(m, torch.Size([2, 3])) is m
    assert torch.equal(rome.upd_matrix_match_shape(m, torch.Size([3, 2])), m.T)
    with pytest.raises(ValueError, match="transpose"):
        rome.upd_matrix_match_shape(m, torch.Size([4, 2]))


def test_lookup_index_and_module_io_at_word(mt, capsys):
    prompt, subject = REQUEST["prompt"], REQUEST["subject"]
    idx = rome.find_fact_lookup_idx(prompt, subject, mt.tokenizer, "subject_last")
    n_subject_end = len(mt.tokenizer(subject)["input_ids"])  # the subject opens the prompt
    assert idx == n_subject_end - 1 and "Lookup index found" in capsys.readouterr().out
    assert rome.find_fact_lookup_idx(prompt, subject, mt.tokenizer, "last", verbose=False) == -1
    name = mt.adapter.rewrite_name(LAYER)
    k, v = rome.get_module_input_output_at_word(mt.model, mt.tokenizer, LAYER, prompt, subject,
                                                mt.adapter.rewrite_template, "subject_last")
    ids = torch.tensor([mt.tokenizer(prompt.format(subject))["input_ids"]])
    with nethook.Trace(mt.model, name, retain_input=True) as tr:
        mt.model(ids)
    torch.testing.assert_close(k, tr.input[0, idx])
    torch.testing.assert_close(v, tr.output[0, idx])
    # another family's module name (the reference's GPT-2 files) means the model's own rewrite module
    k2, _ = rome.get_module_input_output_at_word(mt.model, mt.tokenizer, LAYER, prompt, subject,
                                                 "transformer.h.{}.mlp.nonexistent", "subject_last")
    torch.testing.assert_close(k2, k)


def test_nethook_reference_semantics(mt):
    name = mt.adapter.layer_name(0)
    seen = []
    with nethook.Trace(mt.model, name, edit_output=lambda out: seen.append("one") or out):
        mt.model(torch.tensor([[1, 2, 3]]))
    with nethook.TraceDict(mt.model, [name, name], edit_output=lambda out, layer: seen.append(layer) or out) as td:
        mt.model(torch.tensor([[1, 2, 3]]))
    assert seen == ["one", name] and list(td) == [name]
    t = torch.zeros(3)
    nethook.set_requires_grad(True, t, mt.model)
    assert t.requires_grad and all(p.requires_grad for p in mt.model.parameters())
    nethook.set_requires_grad(False, mt.model)
    assert not any(p.requires_grad for p in mt.model.parameters())


# ---- data sets and the demo helpers --------------------------------------------------------------

def test_datasets_read_local_files(tmp_path, data_dir, mt):
    knowns = dsets.KnownsDataset(tmp_path)  # shipped with rome_fast: copied, no network
    assert len(knowns) == 1209 and knowns[0]["subject"] == "Vinson Massif"
    assert (tmp_path / "known_1000.json").is_file()
    cf = json.loads((data_dir / "counterfact-edit.json").read_text())
    (tmp_path / "counterfact.json").write_text(json.dumps(cf))
    assert len(dsets.CounterFactDataset(tmp_path)) == len(cf)
    assert dsets.CounterFactDataset(tmp_path, size=3)[2] == cf[2]
    zs = json.loads((data_dir / "zsre_mend_train-1k.json").read_text())[:5]
    (tmp_path / "zsre_mend_eval.json").write_text(json.dumps(zs))
    qa = dsets.MENDQADataset(tmp_path, mt.tokenizer)
    rec = qa[0]
    assert len(qa) == 5 and rec["requested_rewrite"]["target_new"]["str"] == zs[0]["answers"][0]
    ans = mt.tokenizer(" " + zs[0]["loc_ans"])["input_ids"]
    assert len(rec["neighborhood_prompts"]) == len(ans)
    assert rec["neighborhood_prompts"][-1]["prompt"] == zs[0]["loc"] + "?" + mt.tokenizer.decode(ans[:-1])
    snippets = [{"relation_id": "P1", "target_id": "Q2", "samples": [{"name": "a", "text": "x"}]},
                {"relation_id": "P1", "target_id": "Q2", "samples": [{"name": "b", "text": "y"}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    snips = dsets.AttributeSnippets(tmp_path)
    assert [s["name"] for s in snips["P1"]["Q2"]] == ["a", "b"] and snips["P9"]["Q9"] == []


def test_demo_helpers(capsys):
    demo.print_loud("Applying ROME to model")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["#" * 28, "#" + " " * 26 + "#", "#  Applying ROME to model  #", "#" + " " * 26 + "#",
                         "#" * 28]
    with pytest.raises(demo.StopExecution):
        demo.stop_execution()
    params_class, apply_fn, folder, suffix = demo.load_alg("ROME")
    assert (params_class, apply_fn, folder, suffix) == (rome.ROMEHyperParams, rome.apply_rome_to_model, "ROME", "")
    with pytest.raises(ValueError, match="ROME"):
        demo.load_alg("MEND")


def test_generate_fast_and_interactive(mt, monkeypatch, capsys):
    from rome_fast.compat.util.generate import generate_fast, generate_interactive
    prompts = ["The Eiffel Tower is", "Miles Davis plays the"]
    a = generate_fast(mt.model, mt.tokenizer, prompts, n_gen_per_prompt=2, max_out_len=12, reseed=3)
    b = generate_fast(mt.model, mt.tokenizer, prompts, n_gen_per_prompt=2, max_out_len=12, reseed=3)
    assert a == b and len(a) == 4  # prompt-major order, each prompt's samples together
    assert all(t.startswith(prompts[i // 2]) for i, t in enumerate(a))
    assert all(len(t) > len(prompts[i // 2]) for i, t in enumerate(a))
    n = len(mt.tokenizer.encode(prompts[0]))  # max_out_len counts the prompt: nothing is added
    assert generate_fast(mt.model, mt.tokenizer, prompts[:1], max_out_len=n) == prompts[:1]
    answers = iter(["", "The Eiffel Tower is"])

    def fake_input(_prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    generate_interactive(mt.model, mt.tokenizer, max_out_len=10, compare_against=mt.model, use_logit_lens=True)
    out = capsys.readouterr().out
    assert out.count("Argument Model: ['The Eiffel Tower is") == 1 and "Baseline Model:" in out
    assert "--- Argument Model Logit Lens ---" in out and f"{mt.num_layers - 1}: [(" in out
