"""Names and paths of the files the package writes for a user, and content hashes of what it read
(docs/security.md).

Ids read from data files (a fact's `known_id`, a case's `case_id`) become file names, so they are
held to a safe alphabet; every path built from them is checked to stay inside the folder the user
chose. Hashes of the input let a resumed run prove it reads the same input as the first one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

# a name that is one path component on every system: no separator, no leading '.' or '-'
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def file_id(value, what: str = "id", names: bool = True) -> str:
    """`value` as it goes into a file name: a non-negative integer, or (with `names`) a string of
    letters, digits, '_', '.', '-' that starts with a letter or digit (at most 128 characters).
    Anything else is a ValueError saying what is allowed."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if names and isinstance(value, str) and _SAFE_NAME.fullmatch(value) and ".." not in value:
        return value
    allowed = ("a non-negative integer or a name of letters, digits, '_', '.' and '-' (starting "
               "with a letter or digit)") if names else "a non-negative integer"
    raise ValueError(f"{what} must be {allowed}, got {value!r}")


def inside(folder, path) -> Path:
    """`path`, after checking that it lies inside `folder` once '.' and '..' are resolved (checked
    on the names, so a folder the user made a symbolic link stays usable)."""
    root = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([root, full]) != root or full == root:
        raise ValueError(f"refusing to write {path}: it is outside the output folder {folder}")
    return Path(path)


def content_sha256(obj) -> str:
    """sha256 of JSON data in a canonical form (sorted keys, no whitespace), so the hash is the
    records', not the file's layout."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_text(path, what: str) -> str:
    """A UTF-8 text file's contents; a missing file, a folder or text that is not UTF-8 is an error
    naming the file as `what` (e.g. "facts file")."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: give the file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_json(text: str, path, expected: str):
    """JSON data of a file's `text`; what is not JSON is an error naming `path` and saying what
    was `expected`."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        why = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise ValueError(f"{path} is not valid JSON ({why}): expected {expected}") from None


def file_sha256(path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def looks_like_path(name, suffixes=()) -> bool:
    """A name meant as a file or folder rather than a hub or dataset name: absolute, starting with
    '.' or '~', holding a Windows separator, or ending in one of `suffixes`. Such a name that does
    not exist is a missing file, not something to look up online."""
    text = str(name)
    return (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text
            or Path(text).suffix.lower() in suffixes)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_PREFIX = ".tmp-"  # the name of an atomic write's temporary file, until it is renamed


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """(open file, its temporary path): a temporary file beside `path`; when the block completes
    it is flushed, fsynced, given an ordinary new file's permissions and renamed over `path`, and
    the folder is fsynced. On any error or interruption it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is its owner's only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder) -> None:
    """Delete what atomic writes into `folder` left when they were cut short (a killed process
    cannot remove its temporary file)."""
    for stale in Path(folder).glob(TEMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)


def atomic_write(path, write, mode: str = "wb") -> None:
    """Create or replace `path` by what `write(file)` writes, never leaving a partial file
    (`atomic_file`)."""
    with atomic_file(path, mode) as (f, _):
        write(f)


def write_json_atomic(path, obj, indent: int = 1) -> None:
    """`obj` as JSON at `path`, written atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode("utf-8")))


def save_tensors_atomic(path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file, written atomically (`atomic_write`)."""
    from safetensors.torch import save
    atomic_write(path, lambda f: f.write(save({n: t.detach().cpu().contiguous() for n, t in tensors.items()},
                                              metadata=metadata)))


def tensors_sha256(tensors: dict) -> str:
    """sha256 of tensors' names, dtypes, shapes and bytes (to recognise weights again)."""
    import torch
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
