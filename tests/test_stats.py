"""Second-moment statistics: the value against a hand computation, the reference's cache layout
and acceptance rule, clear failures on bad files, and the corpus splitting rule."""
import importlib.util
import random

import numpy as np
import pytest
import torch

from rome_fast.edit.corpus import read_text_file, resolve_corpus, split_text
from rome_fast.edit.stats import (layer_stats, length_batches, load_stats_file, save_stats_file,
                                  stats_path, SecondMoment)
from rome_fast.models.random_init import random_texts

LAYER = "transformer.h.1.mlp.c_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    return tiny_models["gpt2"]


def texts(n=60, seed=0):
    return random_texts(n, seed, words=(3, 80))


def hand_mom2(model, tok, layer, docs):
    """Keys collected one text at a time (no padding) with a plain forward hook: KᵀK / n."""
    keys = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, o: keys.append(a[0][0].clone()))
    try:
        with torch.no_grad():
            for d in docs:
                model(input_ids=torch.tensor([tok(d)["input_ids"]]))
    finally:
        h.remove()
    K = torch.cat(keys).double()
    return K.T @ K / len(K), len(K)


def test_mom2_equals_hand_computation(gpt2, tmp_path):
    docs = texts()
    st = layer_stats(gpt2.model, gpt2.tokenizer, LAYER, tmp_path, "toy", sample_size=40, corpus=docs,
                     batch_tokens=200, progress=False)
    order = list(range(len(docs)))
    random.Random(1).shuffle(order)  # the reference's fixed subset
    expect, n = hand_mom2(gpt2.model, gpt2.tokenizer, LAYER, [docs[i] for i in order[:40]])
    assert st.mom2.count == n
    assert st.mom2.mom2.dtype == torch.float32
    torch.testing.assert_close(st.mom2.moment().double(), expect, rtol=1e-4, atol=1e-6)
    # batching and padding do not matter; float64 accumulates in float64
    st64 = layer_stats(gpt2.model, gpt2.tokenizer, LAYER, None, "toy", sample_size=40, corpus=docs,
                       precision="float64", batch_tokens=100000, progress=False)
    assert st64.mom2.mom2.dtype == torch.float64 and st64.mom2.count == n
    torch.testing.assert_close(st64.mom2.moment(), expect, rtol=1e-4, atol=1e-6)


def test_llama_key_is_down_proj_input(tiny_models):
    mt = tiny_models["llama"]
    layer = "model.layers.2.mlp.down_proj"
    docs = texts(12)
    st = layer_stats(mt.model, mt.tokenizer, layer, None, "toy", corpus=docs, progress=False)
    expect, n = hand_mom2(mt.model, mt.tokenizer, layer, [docs[i] for i in _shuffled(len(docs))])
    assert st.mom2.count == n and st.mom2.mom2.shape == (256, 256)
    torch.testing.assert_close(st.mom2.moment().double(), expect, rtol=1e-4, atol=1e-6)


def _shuffled(n):
    order = list(range(n))
    random.Random(1).shuffle(order)
    return order


def test_cache_round_trip_layout_and_sample_size(gpt2, tmp_path):
    docs = texts()
    st = layer_stats(gpt2.model, gpt2.tokenizer, LAYER, tmp_path, "toy", sample_size=30, corpus=docs,
                     progress=False)
    name = gpt2.model.config._name_or_path.replace("/", "_") or type(gpt2.model).__name__
    expected = tmp_path / name / "toy_stats" / f"{LAYER}_float32_mom2_30.npz"
    assert st.path == expected and expected.is_file()
    with np.load(expected) as f:
        assert sorted(f.files) == ["mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"]
        assert int(f["sample_size"]) == 30 and int(f["mom2.count"]) == st.mom2.count
        np.testing.assert_array_equal(f["mom2.mom2"], st.mom2.mom2.numpy())  # the sum, not the mean
    # reloaded from disk without touching the corpus: a corpus that cannot load proves it
    again = layer_stats(gpt2.model, gpt2.tokenizer, LAYER, tmp_path, "toy", sample_size=30,
                        corpus="no/such/dataset-anywhere", progress=False)
    assert torch.equal(again.mom2.mom2, st.mom2.mom2) and again.mom2.count == st.mom2.count
    # a file whose stored sample_size differs is not accepted: recomputed and overwritten
    save_stats_file(expected, SecondMoment(st.mom2.mom2 * 2, st.mom2.count), sample_size=31)
    fresh = layer_stats(gpt2.model, gpt2.tokenizer, LAYER, tmp_path, "toy", sample_size=30, corpus=docs,
                        progress=False)
    torch.testing.assert_close(fresh.mom2.mom2, st.mom2.mom2)
    with np.load(expected) as f:
        assert int(f["sample_size"]) == 30
    assert not list(expected.parent.glob(".tmp-*"))  # atomic writes leave nothing behind


def test_reference_file_loads(gpt2, tmp_path):
    """A file as the reference writes it (float32 sum, int count, constructor string, plus the
    combined stat's own constructor) loads from the reference's path."""
    d = 256
    rng = np.random.default_rng(0)
    A = rng.standard_normal((500, d)).astype(np.float32)
    path = stats_path(tmp_path, "gpt2-xl", "wikipedia", LAYER, "float32", ("mom2",), 100000)
    assert str(path).endswith(f"gpt2-xl/wikipedia_stats/{LAYER}_float32_mom2_100000.npz")
    path.parent.mkdir(parents=True)
    np.savez(path, **{"constructor": np.array("util.runningstats.CombinedStat()"),
                      "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(500), "mom2.mom2": A.T @ A, "sample_size": np.array(100000)})
    st = load_stats_file(path, d, 100000)
    torch.testing.assert_close(st.moment(), torch.from_numpy(A.T @ A / 500))
    assert load_stats_file(path, d, 1000) is None  # another sample size: not accepted


@pytest.mark.parametrize("kind", ["shape", "nonsquare", "nan", "inf", "garbage"])
def test_bad_stats_file_fails_clearly(gpt2, tmp_path, kind):
    path = stats_path(tmp_path, gpt2.model.config._name_or_path or type(gpt2.model).__name__, "toy",
                      LAYER, "float32", ("mom2",), 10)
    path.parent.mkdir(parents=True)
    m = np.eye(256, dtype=np.float32)
    if kind == "shape":
        m = np.eye(64, dtype=np.float32)
    elif kind == "nonsquare":
        m = np.ones((256, 64), dtype=np.float32)
    elif kind == "nan":
        m[3, 4] = np.nan
    elif kind == "inf":
        m[0, 0] = np.inf
    if kind == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        np.savez(path, **{"mom2.mom2": m, "mom2.count": np.array(10), "sample_size": np.array(10)})
    with pytest.raises(ValueError, match=str(path.name)):
        layer_stats(gpt2.model, gpt2.tokenizer, LAYER, tmp_path, "toy", sample_size=10, corpus=texts(),
                    progress=False)


def test_bad_arguments(gpt2):
    with pytest.raises(ValueError, match="mom2"):
        layer_stats(gpt2.model, gpt2.tokenizer, LAYER, None, "toy", to_collect=("mean",), corpus=texts())
    with pytest.raises(ValueError, match="precision"):
        layer_stats(gpt2.model, gpt2.tokenizer, LAYER, None, "toy", precision="float16", corpus=texts())
    with pytest.raises(ValueError, match="no module"):
        layer_stats(gpt2.model, gpt2.tokenizer, "transformer.h.9.mlp.c_proj", None, "toy", corpus=texts())
    with pytest.raises(FileNotFoundError):
        layer_stats(gpt2.model, gpt2.tokenizer, LAYER, None, corpus="missing/corpus.txt")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_dataset_name_without_datasets_is_a_clear_error():
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        resolve_corpus(None, "wikipedia")


def test_length_batches_respect_the_token_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    groups = length_batches(lengths, 300)
    assert sorted(i for g in groups for i in g) == list(range(200))
    for g in groups:
        width = max(lengths[i] for i in g)
        assert width == lengths[g[0]] and (width * len(g) <= 300 or len(g) == 1)


def test_text_file_splitting(tmp_path, data_dir):
    wiki = " = A = \n text a \n = = Sec = = \n more a \n\n = B = \n text b \n"
    assert split_text(wiki) == ["= A = \n text a \n = = Sec = = \n more a", "= B = \n text b"]
    assert split_text("one para\nline two\n\n  \n\nsecond para\n") == ["one para\nline two", "second para"]
    docs = read_text_file(data_dir / "wikitext-2-raw-test.txt")
    assert len(docs) == 62 and docs[0].startswith("= Robert Boulter =")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text"):
        read_text_file(empty)


@pytest.mark.parametrize("collector", ["reference", "fast"])
def test_a_cached_file_of_another_corpus_with_the_same_name_is_refused(gpt2, tmp_path, collector):
    """The cache is named after the corpus's file name: a second corpus of the same name must not
    silently reuse the first one's statistics (the file records the corpus's sha256)."""
    from rome_fast.edit.fast_stats import layer_stats_fast
    collect = layer_stats if collector == "reference" else layer_stats_fast
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "wiki.txt", tmp_path / "b" / "wiki.txt"
    first.write_text("\n\n".join(texts(20, seed=1)))
    second.write_text("\n\n".join(texts(20, seed=2)))
    stats_dir = tmp_path / "stats"
    kw = dict(batch_tokens=200, progress=False)
    st = collect(gpt2.model, gpt2.tokenizer, LAYER, stats_dir, corpus=str(first), **kw)
    with np.load(st.path, allow_pickle=False) as f:
        assert len(str(f["corpus_sha256"])) == 64
    again = collect(gpt2.model, gpt2.tokenizer, LAYER, stats_dir, corpus=str(first), **kw)  # reused
    assert again.path == st.path and torch.equal(again.mom2.mom2, st.mom2.mom2)
    with pytest.raises(ValueError, match="another corpus than the one given now.*delete it"):
        collect(gpt2.model, gpt2.tokenizer, LAYER, stats_dir, corpus=str(second), **kw)
    # a file without a digest (the reference's own files) is still accepted
    with np.load(st.path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files if k != "corpus_sha256"}
    np.savez(st.path, **data)
    old = collect(gpt2.model, gpt2.tokenizer, LAYER, stats_dir, corpus=str(second), **kw)
    assert torch.equal(old.mom2.mom2, st.mom2.mom2)
