"""Data files: a small bundle shipped inside the package, and the official ROME / MEMIT data
fetched once into $ROME_FAST_CACHE/data (default ~/.cache/rome_fast/data).

Bundled (gzip-compressed next to this file; sources and licences in SOURCES.md here):
  known_1000.json          ROME's known-facts set (MIT): the subjects that give the noise σ
  wikitext-2-raw-test.txt  WikiText-2 raw, test split (CC BY-SA 3.0 / GFDL): the text for the
                           key statistics of the embedded model when no corpus is named
`bundled(name)` writes the file once into the cache folder (checked against its sha256) and
returns its path, so everything downstream reads an ordinary text or JSON file.

Downloaded (`fetch(name)`): the files of DATA_URLS, from the addresses the reference code uses,
with a progress bar, into a temporary file in the target folder that is renamed only once it is
complete and checked, so an interrupted or truncated download leaves nothing behind. Checks: the
byte count against Content-Length, the content (valid JSON of the expected shape, or a .npy
without pickles), and the sha256 against SHA256 when this package knows it; otherwise the hash
of the first download is recorded beside the file (`<name>.sha256`) and later uses are checked
against it. Offline, the error is one line naming the URL and the path to put the file at.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..files import atomic_file

ROME_ROOT = "https://rome.baulab.info/data/dsets/"
MEMIT_ROOT = "https://memit.baulab.info/data/dsets/"
DATA_URLS = {name: ROME_ROOT + name for name in (
    "counterfact.json", "known_1000.json", "zsre_mend_eval.json", "attribute_snippets.json",
    "idf.npy", "tfidf_vocab.json")}
DATA_URLS["multi_counterfact.json"] = MEMIT_ROOT + "multi_counterfact.json"

# sha256 of the uncompressed bytes of the files shipped in this package.
BUNDLED = {
    "known_1000.json": "685ed2a0c3e8323921ea8a945b237cfe75e1f4948b9dda7a92aa6c2401f1d9df",
    "wikitext-2-raw-test.txt": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
}
# sha256 of official files, where known for certain. None is: the copies at hand could not be
# compared with the served files, so every download is pinned by its first hash (module doc).
SHA256: dict[str, str] = {}
# Keys every record of a dataset file must have (a cheap check that it is the file it claims).
RECORD_KEYS = {
    "known_1000.json": ("known_id", "subject", "prompt"),
    "counterfact.json": ("case_id", "requested_rewrite"),
    "multi_counterfact.json": ("case_id", "requested_rewrite"),
    "zsre_mend_eval.json": ("subject", "src", "answers"),
}
_HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """$ROME_FAST_CACHE/data: where bundled files are unpacked and downloads are kept."""
    from ..models.loading import cache_root
    return cache_root() / "data"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def bundled(name: str) -> Path:
    """The path of a file shipped with the package, unpacked into cache_dir() on first use."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled data file {name!r}; bundled: {sorted(BUNDLED)}")
    dest = cache_dir() / name
    if dest.is_file() and sha256_file(dest) == BUNDLED[name]:
        return dest
    src = _HERE / f"{name}.gz"
    try:
        data = gzip.decompress(src.read_bytes())
    except (OSError, EOFError) as exc:
        raise FileNotFoundError(f"the bundled {src} is missing or damaged ({exc}); reinstall rome-fast") from None
    if hashlib.sha256(data).hexdigest() != BUNDLED[name]:
        raise ValueError(f"the bundled {src} does not match its checksum; reinstall rome-fast")
    _write_atomic(dest, data)
    return dest


def fetch(name: str, dest_dir=None, progress: bool = True, timeout: float = 60.0) -> Path:
    """The official data file `name` (a key of DATA_URLS) in dest_dir (default cache_dir()),
    downloaded on first use. A file already there is checked, not downloaded again; one put
    there by hand is checked for content and its hash recorded."""
    if name not in DATA_URLS:
        raise ValueError(f"unknown data file {name!r}; known: {sorted(DATA_URLS)}")
    dest = Path(dest_dir or cache_dir()) / name
    if dest.is_file():
        _verify_existing(name, dest)
        return dest
    url = DATA_URLS[name]
    expected = SHA256.get(name)
    with _atomic(dest) as (f, tmp):
        digest = _download(url, f, name, progress, timeout, dest)
        if expected and digest != expected:
            raise ValueError(f"{url} downloaded with sha256 {digest}, expected {expected}: "
                             f"nothing was written to {dest}; try again later or fetch the file by hand")
        f.flush()
        _check_content(name, tmp, where=url)
    if not expected:
        _write_atomic(_pin_path(dest), f"{digest}  {name}\n".encode())
    if progress:
        print(f"{name}: sha256 {digest} -> {dest}", file=sys.stderr)
    return dest


def _download(url: str, f, name: str, progress: bool, timeout: float, dest: Path) -> str:
    """Stream url into the open file f with a progress bar; returns the sha256."""
    from tqdm.auto import tqdm

    put_it = f"download {url} and put it at {dest}"
    h, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:  # offline, cut off
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise FileNotFoundError(f"could not download {name} ({reason}); {put_it}") from None
    if total is not None and got != total:
        raise FileNotFoundError(f"the download of {url} stopped after {got} of {total} bytes; "
                                f"nothing was kept: try again, or {put_it}")
    return h.hexdigest()


def _check_content(name: str, path: Path, where) -> None:
    """A cheap check that the file is what its name says (truncated JSON does not parse)."""
    if name.endswith(".npy"):
        import numpy as np
        try:
            np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any reason the array does not load
            raise ValueError(f"{where} is not a valid .npy array ({exc})") from None
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not valid JSON ({exc})") from None
    keys = RECORD_KEYS.get(name)
    if keys is None:
        return
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: expected a non-empty JSON list of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise ValueError(f"{where}: record {i} lacks one of the keys {list(keys)}")


def _pin_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _verify_existing(name: str, dest: Path) -> None:
    """A file already in place: its known hash, else the hash pinned at its first use."""
    expected = SHA256.get(name)
    pin = _pin_path(dest)
    if not expected and pin.is_file():
        expected = (pin.read_text().split() or [None])[0]
    digest = sha256_file(dest)
    if expected:
        if digest != expected:
            raise ValueError(f"{dest} has sha256 {digest}, not the {expected} recorded for it: delete "
                             f"{dest} (and {pin.name}) to download it again from {DATA_URLS[name]}")
        return
    _check_content(name, dest, where=dest)  # put there by hand: check it once, then pin it
    _write_atomic(pin, f"{digest}  {name}\n".encode())


def _write_atomic(dest: Path, data: bytes) -> None:
    with _atomic(dest) as (f, _):
        f.write(data)


@contextlib.contextmanager
def _atomic(dest: Path):
    """(open file, its path): `files.atomic_file`, with a folder that cannot be written to
    reported in one line."""
    started = False
    try:
        with atomic_file(dest) as (f, tmp):
            started = True
            yield f, tmp
    except OSError as exc:  # the CLI reports FileNotFoundError in one line
        if started:
            raise
        raise FileNotFoundError(f"cannot write in {dest.parent} ({exc}): set ROME_FAST_CACHE to a "
                                "writable folder") from None
