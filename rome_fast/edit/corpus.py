"""Text corpora for the second-moment statistics.

`resolve_corpus` takes any of:
* a list of strings;
* a text file. If it has WikiText-style top-level headings (a line `= Title =` with single '='
  signs, surrounding spaces allowed), each such heading starts a new article and the lines up to
  the next one (section headings `= = … = =` included) are its text, as an article of the
  reference's Wikipedia dataset would be. Otherwise documents are separated by blank lines
  (paragraphs). Leading/trailing whitespace is stripped; empty documents are dropped;
* a JSONL file (`.jsonl`, `.ndjson`): one JSON object per line whose `text` field is the document.
  Blank lines and blank texts are skipped; a line that is not such an object is an error naming
  the file and line. The file is indexed once (line offsets) and read line by line on demand;
* a folder: its `.txt`/`.text`/`.md`/`.raw` and `.jsonl`/`.ndjson` files, recursively, in sorted
  order of their relative paths (hidden ones skipped), each read by its own rule above; a
  document never spans two files;
* a Hugging Face dataset name, `name` or `name:config` (split `train`, column `text`), when the
  `datasets` package is installed (`pip install rome-fast[data]`); with HF_DATASETS_OFFLINE=1 it is
  read from the local `datasets` cache.
A string naming an existing file or folder is always that local path, never a dataset name.
See docs/statistics.md."""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from array import array
from pathlib import Path

from ..files import looks_like_path

_ARTICLE_HEADING = re.compile(r"^\s*=\s(?!=)(.*?)(?<!=)\s=\s*$")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
TEXT_FIELD = "text"

# Dataset names of the reference (`wikipedia`, `wikitext`) mapped to loadable hub datasets: the
# 2020 Wikipedia config and the script loaders are gone from the hub (docs/statistics.md).
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


def _jsonl_text(line: bytes, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"corpus file {path}, line {lineno}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"corpus file {path}, line {lineno}: a JSON {type(obj).__name__}, not an object "
                         f"with a {TEXT_FIELD!r} field")
    if TEXT_FIELD not in obj:
        raise ValueError(f"corpus file {path}, line {lineno}: no {TEXT_FIELD!r} field "
                         f"(fields: {', '.join(sorted(obj)) or 'none'})")
    text = obj[TEXT_FIELD]
    if not isinstance(text, str):
        raise ValueError(f"corpus file {path}, line {lineno}: {TEXT_FIELD!r} is a JSON "
                         f"{type(text).__name__}, not a string")
    return text


class JsonlTexts:
    """The `text` fields of a JSONL file, indexed by line offsets (8 bytes a document in memory)
    and read on demand. Every line is checked once, when the index is built."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file not found: {self.path}")
        self.offsets = array("q")
        pos = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                start, pos = pos, pos + len(line)
                if line.strip() and _jsonl_text(line, self.path, lineno).strip():
                    self.offsets.append(start)
        if not self.offsets:
            raise ValueError(f"corpus file {self.path} contains no text (no line with a non-empty "
                             f"{TEXT_FIELD!r} field)")

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return json.loads(f.readline())[TEXT_FIELD]


class _Concat:
    """Several text sequences as one."""

    def __init__(self, parts):
        self.parts, self.ends, n = parts, [], 0
        for p in parts:
            n += len(p)
            self.ends.append(n)

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.ends, i)
        return self.parts[k][i - (self.ends[k - 1] if k else 0)]


def read_file(path):
    """One corpus file by its suffix: JSONL, else the text-file rule."""
    path = Path(path)
    return JsonlTexts(path) if path.suffix.lower() in JSONL_SUFFIXES else read_text_file(path)


def corpus_files(root: Path) -> list[Path]:
    """A corpus folder's text and JSONL files: recursive, hidden ones skipped, sorted by relative path."""
    return sorted((p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def read_folder(path) -> _Concat:
    """Every text or JSONL file under `path` (recursive, sorted, hidden ones skipped), in order."""
    root = Path(path)
    files = corpus_files(root)
    if not files:
        raise ValueError(f"corpus folder {root} has no text files ({', '.join(CORPUS_SUFFIXES)})")
    parts = []
    for f in files:
        try:
            parts.append(read_file(f))
        except ValueError as exc:
            if "contains no text" not in str(exc):
                raise
    if not parts:
        raise ValueError(f"corpus folder {root}: none of its {len(files)} files contains text")
    return _Concat(parts)


def load_hf_dataset(name: str, config: str | None = None, split: str = "train", text_field: str = TEXT_FIELD):
    """A Hugging Face dataset's texts as an indexable sequence (lazy `datasets` import); `name`
    may carry its config as `name:config`."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError(
            f"the corpus {name!r} is no local file or folder, so it names a Hugging Face dataset, which "
            "needs the `datasets` package (pip install datasets, or pip install 'rome-fast[data]'); "
            "or give a local text file, JSONL file or folder") from None
    if config is None and ":" in name:
        name, config = name.split(":", 1)
    if config is None and name in HF_DATASETS:
        name, config = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # hub, cache and format errors alike: one line for the user
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        where = (" Offline, it must already be in the local datasets cache "
                 f"({datasets.config.HF_DATASETS_CACHE}): load it once with a network.") if offline else ""
        raise ValueError(f"could not load the Hugging Face dataset {name!r}"
                         f"{f' ({config})' if config else ''}, split {split!r}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}.{where}") from None
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no {text_field!r} column (columns: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} ({split}) is empty")
    return _Column(ds, text_field)


class _Column:
    """One text column of a dataset, indexed without materialising the whole corpus."""

    def __init__(self, ds, field):
        self.ds, self.field = ds, field

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)][self.field]


def local_path(corpus) -> Path | None:
    """The existing file or folder a corpus string names, else None (then it is a dataset name)."""
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(os.path.expanduser(os.fspath(corpus)))
        if path.exists():
            return path
    return None


def local_corpus(corpus, ds_name: str | None = None):
    """The corpus to read when statistics are needed: `corpus` if given; else `ds_name` (a
    hparams' mom2_dataset) as a Path when it is an existing file or folder or looks like a path,
    so a local corpus is read as such wherever it is named; else None (`ds_name` is then a
    dataset name, or the name of cached statistics)."""
    if corpus is not None or not ds_name:
        return corpus
    path = local_path(ds_name)
    if path is not None:
        return path
    return Path(str(ds_name)).expanduser() if looks_like_path(ds_name, CORPUS_SUFFIXES) else None


def corpus_name(corpus) -> str:
    """A corpus's name for the statistics' cache folder: a file's stem, a folder's name, a dataset
    name with '/' and ':' as '_', 'corpus' for an in-memory list."""
    if isinstance(corpus, (list, tuple)):
        return "corpus"
    path = local_path(corpus)
    if path is not None:
        return path.stem if path.is_file() else path.resolve().name
    return str(corpus).replace("/", "_").replace(":", "_")


def resolve_corpus(corpus=None, ds_name: str | None = None):
    """(texts, ds_name): `corpus` is a list of strings, a local file or folder, or a dataset name
    (the module docstring); with no corpus, `ds_name` is used the same way (the hparams'
    mom2_dataset: 'wikipedia', 'wikitext', or a local path). texts is an indexable sequence."""
    if corpus is None:
        if not ds_name:
            raise ValueError("no corpus given for the statistics: pass a text or JSONL file, a folder, "
                             "or a dataset name")
        corpus, ds_name = ds_name, None
    name = ds_name or corpus_name(corpus)
    if isinstance(corpus, (list, tuple)):
        texts = [t for t in corpus if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("the corpus list contains no text")
        return texts, name
    path = local_path(corpus)
    if path is not None:
        return (read_folder(path) if path.is_dir() else read_file(path)), name
    if looks_like_path(corpus, CORPUS_SUFFIXES):
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    return load_hf_dataset(os.fspath(corpus)), name


def texts_fingerprint(texts, order, ends: int = 32) -> str:
    """A short hash of a sample: its size and its first and last `ends` texts in sample order
    (tells a checkpoint's corpus from another without reading all of it)."""
    h = hashlib.sha256(f"{len(texts)} {len(order)}".encode())
    for i in list(order[:ends]) + list(order[-ends:]):
        h.update(str(texts[i]).encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


_DIGEST_WHOLE = 1 << 30  # files up to 1 GiB are hashed whole
_DIGEST_ENDS = 8 << 20   # of larger ones: the size and the first and last 8 MiB


def corpus_digest(corpus) -> str | None:
    """A sha256 of a local corpus file's or folder's content, recorded in the statistics files
    made from it, so a cached file made from another corpus of the same name is refused
    (`stats.load_stats_file`). A file: its bytes (beyond 1 GiB: size, first and last 8 MiB, so a
    cached lookup stays quick on a corpus of many GB); a folder: its corpus files' relative
    paths and contents. None, nothing to compare, for a dataset name, a missing path, and an
    in-memory list (its cache is named by the caller's ds_name, and a cached lookup must not
    need the texts)."""
    h = hashlib.sha256()
    path = None if isinstance(corpus, (list, tuple)) else local_path(corpus)
    if path is None:
        return None
    for f in [path] if path.is_file() else corpus_files(path):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else ''} {size}\n".encode())
        with open(f, "rb") as fh:
            if size <= _DIGEST_WHOLE:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(_DIGEST_ENDS))
                fh.seek(size - _DIGEST_ENDS)
                h.update(fh.read(_DIGEST_ENDS))
    return h.hexdigest()


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
