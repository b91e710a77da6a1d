"""A local file is a local file wherever a corpus is named: hparams.mom2_dataset as a path, for both
editing backends and for the CLI's choice of corpus."""
import dataclasses

import pytest
import torch

from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, restore_weights
from rome_fast.edit.corpus import local_corpus, resolve_corpus
from rome_fast.models.random_init import random_texts

pytestmark = pytest.mark.usefixtures("one_thread")
REQ = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}}


@pytest.fixture
def wiki(tmp_path):
    path = tmp_path / "corpora" / "wiki.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(random_texts(120)))
    return path


def _hp(model, mom2_dataset):
    hp = ROMEHyperParams.for_model(model, layer=1)
    return dataclasses.replace(hp, v_num_grad_steps=3, mom2_n_samples=120, mom2_dataset=str(mom2_dataset),
                               context_template_length_params=[[4, 2]])


def test_local_corpus_rule(wiki, tmp_path, monkeypatch):
    assert local_corpus("given.txt", str(wiki)) == "given.txt"
    assert local_corpus(None, str(wiki)) == wiki
    assert local_corpus(None, "wikipedia") is None and local_corpus(None, None) is None
    assert local_corpus(None, str(tmp_path / "missing.txt")) == tmp_path / "missing.txt"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_corpus(None, "~/corpora/wiki.txt") == wiki
    texts, name = resolve_corpus("~/corpora/wiki.txt")
    assert name == "wiki" and len(texts) == 120


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_mom2_dataset_as_a_path(tiny_models, wiki, tmp_path, backend):
    """Without `datasets` this used to fail with 'is a Hugging Face dataset, which needs the
    `datasets` package'; now the file is read, and the statistics are cached under its stem inside
    stats_dir (never next to the file)."""
    mt = tiny_models["gpt2"]
    stats = tmp_path / f"stats-{backend}"
    before = mt.model.transformer.h[1].mlp.c_proj.weight.detach().clone()
    _, orig = apply_rome_to_model(mt.model, mt.tokenizer, [REQ], _hp(mt.model, wiki), return_orig_weights=True,
                                  stats_dir=stats, backend=backend, progress=False)
    try:
        assert not torch.equal(mt.model.transformer.h[1].mlp.c_proj.weight, before)
    finally:
        restore_weights(mt.model, orig)
    files = list(stats.rglob("*.npz"))
    assert len(files) == 1 and files[0].parent.name == "wiki_stats"
    assert list(wiki.parent.iterdir()) == [wiki]


def test_missing_mom2_path_is_a_missing_file(tiny_models, tmp_path):
    mt = tiny_models["gpt2"]
    with pytest.raises(FileNotFoundError, match="corpus file not found: .*nowhere.txt"):
        apply_rome_to_model(mt.model, mt.tokenizer, [REQ], _hp(mt.model, tmp_path / "nowhere.txt"),
                            stats_dir=tmp_path / "stats", progress=False)


def test_cli_corpus_choice(tiny_models, wiki, tmp_path, monkeypatch):
    """`rome-fast edit` and `eval` pick the statistics' corpus the same way (statistics_corpus)."""
    import importlib.util

    from rome_fast.edit.commands import statistics_corpus
    from rome_fast.edit.corpus import default_corpus
    model = tiny_models["gpt2"].model
    stats = tmp_path / "stats"
    monkeypatch.setenv("ROME_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROME_FAST_CORPUS", raising=False)
    assert statistics_corpus("given.txt", "x", model, _hp(model, wiki), stats) == "given.txt"
    assert statistics_corpus(None, "x", model, _hp(model, wiki), stats) == str(wiki)
    hp = _hp(model, "wikipedia")
    assert statistics_corpus(None, "smollm2-135m", model, hp, stats) == str(default_corpus())
    assert statistics_corpus(None, "x", model, dataclasses.replace(hp, mom2_adjustment=False), stats) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="give --corpus FILE .* install `datasets`"):
        statistics_corpus(None, "x", model, hp, stats)
