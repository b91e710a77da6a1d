"""Finding and reading run folders for the report. Everything read here is untrusted: `.npz`
files are read without pickle (`TraceResult.load`), JSON is parsed as data, and a file that cannot be read
safely is skipped with a warning (collected in `Warnings`) instead of failing the report."""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from ..trace.kinds import KINDS as _TRACE_KINDS
from ..trace.results import ResultFileError, TraceResult

KINDS = tuple(_TRACE_KINDS)  # the registered tracing kinds: hidden, mlp, attn
_SUFFIXES = "(" + "|".join(re.escape(k.suffix) for k in _TRACE_KINDS.values() if k.suffix) + ")?"
_CASE_NPZ = re.compile(rf"^knowledge_(.+?){_SUFFIXES}\.npz$")
_SINGLE_NPZ = re.compile(rf"^(.+?){_SUFFIXES}\.npz$")
_EVAL_CASE = re.compile(r"^case_(\d+)\.json$")
_SUFFIX_KIND = {k.suffix: k.name for k in _TRACE_KINDS.values()}
RUN_ORDER = ("trace", "traces", "edit", "eval")


class Warnings(list):
    """Problems met while reading (one line each); printed to stderr and shown in the report."""

    def add(self, path, reason: str) -> None:
        line = f"skipped {path}: {reason}"
        self.append(line)
        print(f"rome-fast report: warning: {line}", file=sys.stderr)


@dataclass
class Run:
    """One run found under the report's folder: `kind` is "trace" (a facts run with cases/),
    "traces" (loose one-fact .npz files, as the demo writes), "eval" (case_*.json) or "edit" (the
    demo's edit.json); `label` is its folder relative to the report's folder."""
    kind: str
    path: Path
    label: str


def _id_key(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def find_runs(root, max_depth: int = 2) -> list[Run]:
    """The runs in `root` and its sub-folders (down to `max_depth`), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root} (give the folder a trace or eval run wrote)")
    runs: list[Run] = []

    def visit(d: Path, depth: int) -> None:
        label = "." if d == root else d.relative_to(root).as_posix()
        cases = d / "cases"
        if cases.is_dir() and any(_CASE_NPZ.match(p.name) for p in cases.iterdir()):
            runs.append(Run("trace", d, label))
        if any(_SINGLE_NPZ.match(p.name) for p in d.glob("*.npz")):
            runs.append(Run("traces", d, label))
        if any(_EVAL_CASE.match(p.name) for p in d.glob("case_*.json")):
            runs.append(Run("eval", d, label))
        if (d / "edit.json").is_file():
            runs.append(Run("edit", d, label))
        if depth < max_depth:
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                              and p.name not in ("cases", "pdfs")):
                visit(sub, depth + 1)

    visit(root, 0)
    runs.sort(key=lambda r: (RUN_ORDER.index(r.kind), r.label))  # traces, then the edits
    if not runs:
        raise ValueError(f"no run found in {root}: expected a trace run (cases/knowledge_*.npz), trace "
                         "results (*.npz), an eval run (case_*.json) or the demo's edit.json, here or in "
                         "a sub-folder")
    return runs


# ---- safe readers -------------------------------------------------------------------------------

def is_number(x) -> bool:
    """A finite number read from JSON (not a boolean, not NaN)."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def plotly_text(s) -> str:
    """A string read from a file, for Plotly's titles, ticks and legends, which read a small HTML
    subset (<b>, <a href>, entities): entity-escaped, it shows as the text it is."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def read_json(path: Path, warnings: Warnings):
    """Parsed JSON, or None (with a warning) when the file is unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        warnings.add(path, f"not readable JSON ({exc})")
        return None


def read_trace(path: Path, warnings: Warnings) -> TraceResult | None:
    """One fact's trace, read without pickle and checked for consistent shapes
    (`TraceResult.load`); None (with a warning) otherwise."""
    try:
        return TraceResult.load(path)
    except ResultFileError as exc:
        warnings.add(path, exc.reason)
    return None


def read_trace_cases(cases_dir: Path, warnings: Warnings) -> dict[str, dict[str, TraceResult]]:
    """{fact id: {kind: TraceResult}} of a facts run's cases/ folder, ids in numeric order."""
    found: dict[str, dict[str, Path]] = {}
    for p in Path(cases_dir).iterdir():
        m = _CASE_NPZ.match(p.name)
        if m:
            found.setdefault(m.group(1), {})[_SUFFIX_KIND[m.group(2) or ""]] = p
    return _read_groups(found, warnings)


def read_single_traces(folder: Path, warnings: Warnings) -> dict[str, dict[str, TraceResult]]:
    """{stem: {kind: TraceResult}} of loose `STEM[_mlp|_attn].npz` files (the demo's layout)."""
    found: dict[str, dict[str, Path]] = {}
    for p in Path(folder).glob("*.npz"):
        m = _SINGLE_NPZ.match(p.name)
        if m:
            found.setdefault(m.group(1), {})[_SUFFIX_KIND[m.group(2) or ""]] = p
    return _read_groups(found, warnings)


def _read_groups(found: dict[str, dict[str, Path]], warnings: Warnings) -> dict[str, dict[str, TraceResult]]:
    out = {}
    for key in sorted(found, key=_id_key):
        kinds = {}
        for kind in KINDS:
            if kind in found[key]:
                r = read_trace(found[key][kind], warnings)
                if r is not None:
                    kinds[kind] = r
        if kinds:
            out[key] = kinds
    return out


def read_eval_cases(folder: Path, warnings: Warnings) -> list[dict]:
    """The case files of an eval run (dicts), by case id; unreadable ones skipped with a warning."""
    paths = sorted((p for p in Path(folder).glob("case_*.json") if _EVAL_CASE.match(p.name)),
                   key=lambda p: int(_EVAL_CASE.match(p.name).group(1)))
    cases = []
    for p in paths:
        c = read_json(p, warnings)
        if c is None:
            continue
        if not isinstance(c, dict):
            warnings.add(p, "not a JSON object")
            continue
        c.setdefault("case_id", int(_EVAL_CASE.match(p.name).group(1)))
        cases.append(c)
    return cases


@dataclass
class Facts:
    """Optional fact records (known_1000 format) by id, to name subjects and relations."""
    by_id: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path) -> "Facts":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"facts file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON facts file ({exc})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of fact records (known_1000 format)")
        return cls({str(r.get("known_id", i)): r for i, r in enumerate(data) if isinstance(r, dict)})
