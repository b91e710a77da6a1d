"""`TraceResult`: one fact's trace for one kind, saved in the reference's `.npz` layout.

The file holds the keys of the reference's result dict (`scores`, `low_score`, `high_score`,
`input_ids`, `input_tokens`, `subject_range`, `answer`, `window`, `correct_prediction`, `kind`), all
plain arrays (strings as fixed-width unicode), so the reference's notebooks read ours and
`TraceResult.load` reads theirs.

Files are read without pickle: a pickled member could run any code when loaded
(docs/security.md). The one pickled value the reference writes, `kind=None` for hidden states (NumPy
stores None as an object array), is recognised by disassembling its pickle, never by running it."""
from __future__ import annotations

import io
import pickletools
import zipfile
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write
from ..tokens import decode_tokens
from .kinds import get_kind, stored_kind


def result_dict(tokenizer, input_ids, answer: int, high_score: float, window: int, kind,
                scores: torch.Tensor | None = None, low_score: float | None = None,
                subject_range=None) -> dict:
    """The reference's result dict of one fact and kind (what `calculate_hidden_flow` returns, on
    either backend). Without scores it is the dict of a fact whose prediction was not the expected
    one: the reference stops before locating the subject or tracing anything."""
    ids = [int(t) for t in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    answer, tokens, kind = decode_tokens(tokenizer, [answer])[0], decode_tokens(tokenizer, ids), get_kind(kind).stored
    if scores is None:
        return dict(correct_prediction=False, answer=answer, high_score=float(high_score),
                    input_ids=torch.tensor(ids), input_tokens=tokens, window=window, kind=kind)
    return dict(scores=scores, low_score=float(low_score), high_score=float(high_score),
                input_ids=torch.tensor(ids), input_tokens=tokens, subject_range=tuple(subject_range),
                answer=answer, window=window, correct_prediction=True, kind=kind)


@dataclass
class TraceResult:
    """The reference's result dict as a dataclass; fields absent for a wrong prediction are None."""
    correct_prediction: bool = True
    scores: torch.Tensor | None = None        # tokens × layers, p(answer) with one state restored
    low_score: float | None = None            # corrupted, nothing restored
    high_score: float | None = None           # clean
    input_ids: torch.Tensor | None = None
    input_tokens: list[str] | None = None
    subject_range: tuple[int, int] | None = None
    answer: str | None = None                 # decoded top-1 clean token (unstripped)
    window: int | None = None
    kind: str = ""                            # as the reference stores it: "" (hidden states), "mlp", …
    extra: dict = field(default_factory=dict)  # any other keys (kept on save)

    @classmethod
    def from_dict(cls, d) -> "TraceResult":
        """From a `calculate_hidden_flow` dict (or an npz mapping), normalising types."""
        d = dict(d)
        out = cls(correct_prediction=bool(_scalar(d.pop("correct_prediction", True))))
        if "scores" in d:
            s = d.pop("scores")
            out.scores = s.detach().cpu() if torch.is_tensor(s) else torch.as_tensor(np.asarray(s))
        for key in ("low_score", "high_score"):
            if key in d:
                setattr(out, key, float(_scalar(d.pop(key))))
        if "input_ids" in d:
            ids = d.pop("input_ids")
            out.input_ids = ids.detach().cpu() if torch.is_tensor(ids) else torch.as_tensor(np.asarray(ids))
        if "input_tokens" in d:
            out.input_tokens = [str(t) for t in list(d.pop("input_tokens"))]
        if "subject_range" in d:
            out.subject_range = tuple(int(x) for x in np.asarray(d.pop("subject_range")).tolist())
        if "answer" in d:
            out.answer = str(_scalar(d.pop("answer")))
        if "window" in d:
            out.window = int(_scalar(d.pop("window")))
        if "kind" in d:
            out.kind = stored_kind(_scalar(d.pop("kind")))
        out.extra = d
        return out

    def to_dict(self) -> dict:
        """The reference's dict (only the keys that are known)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if v is not None}
        d.update(self.extra)
        return d

    # Mapping-style access, so plotting code written for the reference's dicts takes a TraceResult.
    def __getitem__(self, key):
        return self.to_dict()[key]

    def get(self, key, default=None):
        return self.to_dict().get(key, default)

    def save(self, path) -> Path:
        """Write the `.npz` atomically (`files.atomic_write`)."""
        path = Path(path)
        arrays = {}
        for key, value in self.to_dict().items():
            if torch.is_tensor(value):
                value = value.detach().cpu().numpy()
            elif key == "high_score":
                value = np.float32(value)  # the reference stores the clean probability as float32
            arrays[key] = np.asarray(value)
            if arrays[key].dtype.hasobject:  # only pickle could store it, and we never read pickles
                raise ValueError(f"cannot save {key!r} ({type(value).__name__}) in {path}: result files "
                                 "hold numbers and strings only")
        atomic_write(path, lambda f: np.savez(f, **arrays))  # a file object: savez would append ".npz" to a name
        return path

    @classmethod
    def load(cls, path) -> "TraceResult":
        """Read a `.npz` written by `save` or by the reference, without pickle. A file that cannot
        be read (truncated, not an npz, pickled objects, fields of the wrong shape) is a
        `ResultFileError` naming it."""
        arrays = read_npz(path)
        try:
            result = cls.from_dict(arrays)
            _check_fields(result)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise ResultFileError(path, f"not a trace result ({exc})") from None
        return result

    # Convenience for summaries -------------------------------------------------------------------
    @property
    def subject_tokens(self) -> list[int]:
        return list(range(*self.subject_range)) if self.subject_range else []

    def peak(self) -> tuple[int, int, float]:
        """(token index, layer, score) of the strongest restoration."""
        if self.scores is None:
            raise ValueError("this result has no scores (the model's prediction was not the expected one)")
        flat = int(torch.argmax(self.scores))
        t, layer = divmod(flat, self.scores.shape[1])
        return t, layer, float(self.scores[t, layer])


class ResultFileError(ValueError):
    """A result file that does not load: truncated, not an npz, holding pickled objects, or with
    fields of the wrong shape. `path` and `reason` say which and why."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}: delete it (a trace run computes it again)")


def read_npz(path) -> dict:
    """The arrays of an `.npz`, read without pickle; the reference's pickled `kind=None` comes back
    as None. Anything else is a `ResultFileError` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ResultFileError(path, "a single .npy array, not an .npz result file")
            out = {}
            for key in data.files:
                try:
                    out[key] = data[key]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc) and "Object arrays" not in str(exc):
                        raise
                    if key != "kind" or not _pickled_none(data.zip.read(key + ".npy")):
                        raise ResultFileError(path, f"{key!r} holds pickled Python objects, which are not "
                                                    "loaded (unpickling a data file can run any code)") from None
                    out[key] = None
            return out
    except ResultFileError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        raise ResultFileError(path, f"does not load ({type(exc).__name__}: {exc}); it may be truncated") from None


# What NumPy writes for a 0-d object array holding None, in any protocol (NumPy 1 and 2 module names)
_NONE_ARRAY_STRINGS = {"numpy.core.multiarray", "numpy._core.multiarray", "_reconstruct", "numpy", "ndarray",
                       "dtype", "O8", "|", "b", "latin1", "_codecs", "encode"}
_NONE_ARRAY_GLOBALS = {"numpy.core.multiarray _reconstruct", "numpy._core.multiarray _reconstruct",
                       "numpy ndarray", "numpy dtype", "_codecs encode"}
_MEMO_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
_NONE_ARRAY_OPS = _MEMO_OPS | {
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE",
    "EMPTY_LIST", "APPEND", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2",
    "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "SHORT_BINSTRING", "STOP"}


def _pickled_none(npy: bytes) -> bool:
    """Whether an object-array `.npy` member is a 0-d array holding None: its header says so, its
    pickle names nothing but NumPy's array reconstruction, and its one element is None.
    `pickletools.genops` only reads the opcodes: nothing is imported or run."""
    f = io.BytesIO(npy)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return False
        shape, _, dtype = read_header(f)
        if shape != () or dtype != np.dtype(object):
            return False
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(f)]
    except ValueError:
        return False
    for name, arg in ops:
        if name not in _NONE_ARRAY_OPS:
            return False
        if name == "GLOBAL" and arg not in _NONE_ARRAY_GLOBALS:
            return False
        if isinstance(arg, (str, bytes)) and name != "GLOBAL" and \
                (arg.decode("latin1") if isinstance(arg, bytes) else arg) not in _NONE_ARRAY_STRINGS:
            return False
    tail = [name for name, _ in ops if name not in _MEMO_OPS]
    return tail[-6:] == ["EMPTY_LIST", "NONE", "APPEND", "TUPLE", "BUILD", "STOP"]


def _check_fields(r: "TraceResult") -> None:
    """What the code reading a result relies on (consistent shapes), so a malformed file fails
    here, naming itself."""
    if r.input_tokens is None:
        raise ValueError("no input_tokens")
    if r.input_ids is not None and (r.input_ids.dim() != 1 or r.input_ids.is_floating_point()):
        raise ValueError("'input_ids' must be a 1-D integer array")
    if r.correct_prediction:
        n = len(r.input_tokens)
        if r.scores is None or r.scores.dim() != 2 or not r.scores.is_floating_point():
            raise ValueError("a correct prediction needs 'scores', a tokens × layers float array")
        if r.scores.shape[0] != n:
            raise ValueError(f"{r.scores.shape[0]} score rows for {n} tokens")
        if r.subject_range is None or len(r.subject_range) != 2 or not 0 <= r.subject_range[0] < r.subject_range[1] <= n:
            raise ValueError(f"subject_range {r.subject_range} outside the {n} tokens")
        if r.low_score is None or r.high_score is None:
            raise ValueError("a correct prediction needs 'low_score' and 'high_score'")


def _scalar(v: Any):
    if isinstance(v, np.ndarray):
        return v.item() if v.shape == () else v
    if torch.is_tensor(v):
        return v.item()
    return v
