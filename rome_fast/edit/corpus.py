"""Text corpora for the second-moment statistics: a plain text file or a Hugging Face dataset.

Text-file rule: if the file has WikiText-style top-level headings (a line `= Title =` with single
'=' signs, surrounding spaces allowed), each such heading starts a new article and the lines up to
the next one (section headings `= = … = =` included) are its text, as an article of the
reference's Wikipedia dataset would be. Otherwise documents are separated by blank lines
(paragraphs). Leading/trailing whitespace is stripped; empty documents are dropped."""
from __future__ import annotations

import os
import re
from pathlib import Path

_ARTICLE_HEADING = re.compile(r"^\s*=\s(?!=)(.*?)(?<!=)\s=\s*$")

# Dataset names of the reference (`wikipedia`, `wikitext`) mapped to loadable hub datasets:
# the 20200501.en Wikipedia config and the script loaders are gone (REFERENCE.md §6.2 items 2, 12).
HF_DATASETS = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}


def split_text(text: str) -> list[str]:
    """A text file's content as a list of documents (the module docstring gives the rule)."""
    lines = text.splitlines()
    if any(_ARTICLE_HEADING.match(line) for line in lines):
        docs, cur = [], []
        for line in lines:
            if _ARTICLE_HEADING.match(line) and cur:
                docs.append("\n".join(cur))
                cur = []
            cur.append(line)
        docs.append("\n".join(cur))
    else:
        docs = re.split(r"\n\s*\n", text)
    return [d.strip() for d in docs if d.strip()]


def read_text_file(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    docs = split_text(path.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise ValueError(f"corpus file {path} contains no text")
    return docs


def load_hf_dataset(name: str, config: str | None = None, split: str = "train", text_field: str = "text"):
    """A Hugging Face dataset's texts as an indexable sequence (lazy `datasets` import)."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError(
            f"the corpus {name!r} is a Hugging Face dataset, which needs the `datasets` package "
            "(pip install datasets); or pass a local text file as the corpus") from None
    if config is None and name in HF_DATASETS:
        name, config = HF_DATASETS[name]
    ds = datasets.load_dataset(name, config, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no {text_field!r} column (columns: {ds.column_names})")
    return _Column(ds, text_field)


class _Column:
    """One text column of a dataset, indexed without materialising the whole corpus."""

    def __init__(self, ds, field):
        self.ds, self.field = ds, field

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)][self.field]


def looks_like_path(name) -> bool:
    """A corpus name meant as a file: a text suffix, an absolute path, or one starting with '.'
    or '~'. Such a name that does not exist is a missing file, not a Hugging Face dataset."""
    text = str(name)
    return (Path(text).suffix.lower() in (".txt", ".text", ".raw", ".md") or os.path.isabs(text)
            or text.startswith((".", "~")))


def local_corpus(corpus, ds_name: str | None = None):
    """The corpus to read when statistics are needed: `corpus` if given; else `ds_name` (a
    hparams' mom2_dataset) as a Path when it is an existing file or looks like a path, so a
    local file is read as a file wherever a corpus is named; else None (`ds_name` is then a
    dataset name, or the name of cached statistics)."""
    if corpus is not None or not ds_name:
        return corpus
    path = Path(str(ds_name)).expanduser()
    return path if path.is_file() or looks_like_path(ds_name) else None


def resolve_corpus(corpus=None, ds_name: str | None = None):
    """(texts, ds_name): `corpus` is a list of strings, a text-file path, or a dataset name;
    with no corpus, `ds_name` names the dataset (the reference's 'wikipedia' / 'wikitext')."""
    if corpus is None:
        if not ds_name:
            raise ValueError("no corpus given for the statistics: pass a text file or a dataset name")
        return load_hf_dataset(ds_name), ds_name
    if isinstance(corpus, (list, tuple)):
        texts = [t for t in corpus if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("the corpus list contains no text")
        return texts, ds_name or "corpus"
    path = Path(corpus).expanduser()
    if path.is_file():
        return read_text_file(path), ds_name or path.stem
    if looks_like_path(corpus):
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    return load_hf_dataset(str(corpus)), ds_name or str(corpus).replace("/", "_")


def default_corpus() -> Path:
    """The text for the embedded model's statistics when none is named: $ROME_FAST_CORPUS if set,
    else WikiText-2 (raw, test split) as shipped with the package (see rome_fast/data)."""
    env = os.environ.get("ROME_FAST_CORPUS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ROME_FAST_CORPUS={env} is not a file: point it at a text file or unset it")
        return path
    from ..data import bundled
    return bundled("wikitext-2-raw-test.txt")
