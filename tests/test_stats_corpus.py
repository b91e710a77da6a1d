"""Every kind of statistics corpus is read (text file, JSONL, folder, Hugging Face name), in a
deterministic order, and bad corpora fail with one clear line naming the file (and line)."""
import json
import random
import sys
import types

import pytest

from rome_fast.edit.corpus import JsonlTexts, corpus_name, read_folder, resolve_corpus
from rome_fast.edit.stats import corpus_ds_name, sample_order, stats_path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_file_and_jsonl(tmp_path):
    txt = tmp_path / "wiki.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    texts, name = resolve_corpus(str(txt))
    assert list(texts) == ["first doc\nline two", "second doc"] and name == "wiki"
    js = write_jsonl(tmp_path / "docs.jsonl", [{"text": "alpha beta", "id": 1}, "", {"text": "  "},
                                               {"text": "gamma\ndelta", "url": "x"}])
    texts, name = resolve_corpus(js)
    assert isinstance(texts, JsonlTexts) and name == "docs"
    assert len(texts) == 2 and [texts[i] for i in range(2)] == ["alpha beta", "gamma\ndelta"]  # blank skipped


@pytest.mark.parametrize("line, message", [
    ('{"title": "no text here"}', r"docs.jsonl, line 2: no 'text' field \(fields: title\)"),
    ('{"text": 3}', r"docs.jsonl, line 2: 'text' is a JSON int, not a string"),
    ('["text"]', r"docs.jsonl, line 2: a JSON list, not an object"),
    ('{"text": "unterminated', r"docs.jsonl, line 2: not valid JSON"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    js = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, line, {"text": "also fine"}])
    with pytest.raises(ValueError, match=message):
        resolve_corpus(str(js))


def test_folder_in_sorted_order_each_file_by_its_rule(tmp_path):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(" = A = \n text a \n = B = \n text b \n")  # two WikiText articles
    write_jsonl(root / "b" / "c.jsonl", [{"text": "from jsonl"}])
    (root / "b" / "d.md").write_text("para one\n\npara two")
    (root / "b" / "empty.txt").write_text("\n \n")  # no text: skipped, not an error
    (root / ".hidden.txt").write_text("never read")
    (root / "image.png").write_bytes(b"\x89PNG")
    texts, name = resolve_corpus(str(root))
    assert name == "corpus"
    assert [texts[i] for i in range(len(texts))] == ["= A = \n text a", "= B = \n text b", "from jsonl",
                                                     "para one", "para two"]
    with pytest.raises(IndexError):
        texts[5]


@pytest.mark.parametrize("kind", ["text", "jsonl", "folder", "folder-of-empty", "list"])
def test_empty_corpus_is_a_clear_error(tmp_path, kind):
    if kind == "text":
        corpus = tmp_path / "e.txt"
        corpus.write_text("\n\n   \n")
        match = "e.txt contains no text"
    elif kind == "jsonl":
        corpus = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, "", {"text": " \n"}])
        match = "e.jsonl contains no text"
    elif kind == "folder":
        corpus = tmp_path / "f"
        corpus.mkdir()
        (corpus / "x.bin").write_bytes(b"\0")
        match = "has no text files"
    elif kind == "folder-of-empty":
        corpus = tmp_path / "f"
        corpus.mkdir()
        (corpus / "x.txt").write_text("")
        write_jsonl(corpus / "y.jsonl", [""])
        match = "none of its 2 files contains text"
    else:
        corpus = ["", "  ", None]
        match = "contains no text"
    with pytest.raises(ValueError, match=match):
        resolve_corpus(corpus if kind == "list" else str(corpus))


def test_local_path_is_never_a_dataset_name(tmp_path, monkeypatch):
    """hparams.mom2_dataset = "/path/wiki" (no corpus argument, no known suffix) reads the file,
    and its cache folder is its stem inside the statistics folder."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    plain = tmp_path / "wiki_dump"
    plain.write_text("one\n\ntwo\n")
    texts, name = resolve_corpus(None, str(plain))
    assert list(texts) == ["one", "two"] and name == "wiki_dump"
    assert corpus_ds_name(None, str(plain)) == "wiki_dump"
    p = stats_path(tmp_path / "stats", "m", corpus_ds_name(None, str(plain)), "l", sample_size=5)
    assert p.parent == tmp_path / "stats" / "m" / "wiki_dump_stats"
    # names from configs and hparams never climb out of the statistics folder
    for bad in ("/etc/passwd", "..", "../x"):
        assert (tmp_path / "stats") in stats_path(tmp_path / "stats", bad, bad, "l").parents
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        resolve_corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        resolve_corpus("wikipedia")


def _fake_datasets(rows, calls, fail=None):
    """A stand-in for the `datasets` package: records load_dataset's arguments."""
    class Dataset:
        column_names = ["text", "id"]

        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"text": rows[i], "id": i}

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if fail:
            raise fail
        return Dataset()
    return types.SimpleNamespace(load_dataset=load_dataset,
                                 config=types.SimpleNamespace(HF_DATASETS_CACHE="/cache/datasets"))


def test_hugging_face_dataset_name(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(["doc a", "doc b", "doc c"], calls))
    texts, name = resolve_corpus("wikitext")  # the reference's name -> its loadable hub dataset
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train")
    assert len(texts) == 3 and texts[2] == "doc c" and name == "wikitext"
    texts, name = resolve_corpus("org/corpus:en")
    assert calls[-1] == ("org/corpus", "en", "train") and name == "org_corpus_en"
    assert corpus_name("org/corpus:en") == "org_corpus_en"


def test_hugging_face_offline_without_cache_says_where(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets",
                        _fake_datasets([], calls, fail=ConnectionError("Couldn't reach 'org/x' on the Hub (offline)")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'org/x'.*ConnectionError.*local datasets cache \(/cache/datasets\)"):
        resolve_corpus("org/x")


def test_sample_order_is_the_references_fixed_subset():
    order = list(range(1000))
    random.Random(1).shuffle(order)
    assert sample_order(1000, 100) == order[:100]  # FixedRandomSubsetSampler
    assert sample_order(1000) == order
    assert sample_order(1000, 50, seed=7) == sample_order(1000, 50, seed=7) != sample_order(1000, 50)
    # a smaller sample is a prefix of a larger one: a run stopped early used exactly the texts
    # a run of that size would use
    assert sample_order(1000, 300)[:200] == sample_order(1000, 200)
    assert stats_path("s", "m", "d", "l", sample_size=10, seed=7).name == "l_float32_mom2_10_seed7.npz"
    assert stats_path("s", "m", "d", "l", sample_size=10).name == "l_float32_mom2_10.npz"
