"""`TraceResult`: one fact's trace for one kind, saved in the reference's `.npz` layout.

The file holds the keys of the reference's result dict (`scores`, `low_score`, `high_score`,
`input_ids`, `input_tokens`, `subject_range`, `answer`, `window`, `correct_prediction`, `kind`), all
plain arrays, so the reference's notebooks read ours and `TraceResult.load` reads theirs."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
        """Write the `.npz` atomically (a temp file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for key, value in self.to_dict().items():
            if torch.is_tensor(value):
                value = value.detach().cpu().numpy()
            elif key == "high_score":
                value = np.float32(value)  # the reference stores the clean probability as float32
            arrays[key] = np.asarray(value)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:  # a file object: savez would append ".npz" to a name
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> "TraceResult":
        """Read a `.npz` written by `save` or by the reference."""
        with np.load(path, allow_pickle=True) as data:
            return cls.from_dict({k: data[k] for k in data.files})

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


def _scalar(v: Any):
    if isinstance(v, np.ndarray):
        return v.item() if v.shape == () else v
    if torch.is_tensor(v):
        return v.item()
    return v
