"""Average causal effects over many facts (the paper's Fig. 2 / Fig. 7; docs/tracing.md).

Each correctly predicted fact's score rows are put into six token buckets; a bucket's mean row
minus the mean corrupted score is the average indirect effect (AIE) of restoring that state at
each layer. The "middle subject" and "further" buckets take every token row as its own sample, so
they are averages over tokens, not facts (as the reference)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import numpy as np

from ..files import file_id, inside, write_json_atomic
from .kinds import get_kind, kind_names
from .plots import plot_aie_heatmaps, plot_aie_lines
from .results import TraceResult

BUCKETS = ("First subject token", "Middle subject tokens", "Last subject token",
           "First subsequent token", "Further tokens", "Last token")


def bucket_rows(scores: np.ndarray, subject_range: Sequence[int]) -> list[list[np.ndarray]]:
    """The score rows of one fact in the six buckets of `BUCKETS`.

    With subject tokens [fs, fa) and T tokens: first = fs, middle = fs+1…fa−2, last subject = fa−1,
    first subsequent = fa, further = fa+1…T−2, last = T−1. A one-token subject is both first and
    last subject token; a row can likewise be first subsequent and last token (as the reference)."""
    scores = np.asarray(scores)
    fs, fa = int(subject_range[0]), int(subject_range[1])
    last = len(scores) - 1
    out: list[list[np.ndarray]] = [[scores[fs]], list(scores[fs + 1:fa - 1]), [scores[fa - 1]],
                                   [scores[fa]] if fa <= last else [], list(scores[fa + 1:last]),
                                   [scores[last]]]
    return out


@dataclass
class KindAggregate:
    """Averages over the correctly predicted facts of one kind."""
    buckets: ClassVar[tuple] = BUCKETS  # the row labels of `mean`, `std`, `count`, `aie`
    kind: str
    n_facts: int               # results read
    n_correct: int             # of which the model predicted the expected answer
    high: float                # mean clean p(answer)
    low: float                 # mean corrupted p(answer)
    mean: np.ndarray           # 6 × layers: mean restored score per bucket
    std: np.ndarray            # 6 × layers: std (ddof 0) per bucket
    count: np.ndarray          # 6: samples per bucket
    best_fixed: float          # mean over facts of the best score anywhere
    best_fixed_last_subject: float
    best_fixed_last_token: float

    @property
    def ate(self) -> float:
        """Average total effect: mean clean − mean corrupted probability."""
        return self.high - self.low

    @property
    def aie(self) -> np.ndarray:
        """6 × layers average indirect effects (bucket mean − mean low score)."""
        return self.mean - self.low

    @property
    def ci95(self) -> np.ndarray:
        """Half-width of the 95 % interval of each bucket mean: 1.96·std/√count."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.96 * self.std / np.sqrt(self.count)[:, None]

    def best(self, bucket: int) -> tuple[float, int]:
        """(best AIE over layers, its layer) for a bucket index of `BUCKETS`."""
        row = self.aie[bucket]
        layer = int(np.nanargmax(row))
        return float(row[layer]), layer

    def summary(self) -> dict:
        """JSON-ready numbers: ATE, best AIEs with their layers, and the per-layer arrays."""
        d = dict(kind=self.kind, n_facts=self.n_facts, n_correct=self.n_correct,
                 mean_high_score=self.high, mean_low_score=self.low, ate=self.ate,
                 avg_best_fixed_score=self.best_fixed,
                 avg_best_fixed_last_subject_score=self.best_fixed_last_subject,
                 avg_best_fixed_last_token_score=self.best_fixed_last_token)
        for name, bucket in (("last_subject_token", 2), ("last_token", 5)):
            value, layer = self.best(bucket)
            d[f"best_aie_{name}"] = value
            d[f"best_aie_{name}_layer"] = layer
        d["buckets"] = {b: dict(count=int(self.count[i]), aie=_floats(self.aie[i]),
                                ci95=_floats(self.ci95[i]))
                        for i, b in enumerate(BUCKETS)}
        return d


def _floats(a) -> list:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def aggregate_results(results: Iterable, kind: str = "hidden") -> KindAggregate:
    """Average the correctly predicted results (TraceResult or reference dicts) of one kind."""
    rows: list[list[np.ndarray]] = [[] for _ in BUCKETS]
    highs, lows, fmax, fle, fla = [], [], [], [], []
    n_facts = 0
    n_layers = None
    for r in results:
        r = r if isinstance(r, TraceResult) else TraceResult.from_dict(r)
        n_facts += 1
        if not r.correct_prediction:
            continue
        scores = r.scores.double().numpy()
        if n_layers is None:
            n_layers = scores.shape[1]
        elif scores.shape[1] != n_layers:
            raise ValueError(f"results of different models: {scores.shape[1]} vs {n_layers} layers")
        for bucket, found in zip(rows, bucket_rows(scores, r.subject_range)):
            bucket.extend(found)
        highs.append(r.high_score)
        lows.append(r.low_score)
        fs, fa = r.subject_range
        fmax.append(scores.max())
        fle.append(scores[fa - 1].max())
        fla.append(scores[-1].max())
    if not highs:
        raise ValueError(f"no correctly predicted facts among the {n_facts} {kind} results: nothing to average")
    nan = np.full(n_layers, np.nan)
    mean = np.stack([np.mean(b, axis=0) if b else nan for b in rows])
    std = np.stack([np.std(b, axis=0) if b else nan for b in rows])
    return KindAggregate(kind=kind, n_facts=n_facts, n_correct=len(highs), high=float(np.mean(highs)),
                         low=float(np.mean(lows)), mean=mean, std=std,
                         count=np.array([len(b) for b in rows]), best_fixed=float(np.mean(fmax)),
                         best_fixed_last_subject=float(np.mean(fle)),
                         best_fixed_last_token=float(np.mean(fla)))


def case_path(cases_dir, known_id, kind: str = "hidden") -> Path:
    """The reference's file name of one fact's result: knowledge_{id}[_mlp|_attn].npz. The id must
    be a safe file name (`files.file_id`), and the path stays inside `cases_dir`."""
    name = f"knowledge_{file_id(known_id, 'known_id')}{get_kind(kind).suffix}.npz"
    return inside(cases_dir, Path(cases_dir) / name)


def load_cases(cases_dir, kind: str = "hidden", ids: Iterable | None = None) -> list[TraceResult]:
    """Results of one kind from a cases folder: the given ids (missing files skipped), else all."""
    cases_dir = Path(cases_dir)
    if ids is None:
        pat = re.compile(rf"^knowledge_(\d+){re.escape(get_kind(kind).suffix)}\.npz$")
        ids = sorted(int(m.group(1)) for p in cases_dir.glob("knowledge_*.npz") if (m := pat.match(p.name)))
    paths = [case_path(cases_dir, i, kind) for i in ids]
    return [TraceResult.load(p) for p in paths if p.is_file()]


def aggregate_dir(out_dir, kinds: Sequence[str] | str = "all", ids: Iterable | None = None,
                  figures: bool = True, modelname: str | None = None, skipped: Sequence[dict] = ()) -> dict:
    """Aggregate `out_dir/cases`, write `out_dir/summary.json` and, with `figures`, the AIE heat
    maps and line plots (PNG + PDF). Returns the summary dict: {kind: its summary} (kinds without
    results are left out), and "skipped_records" (the bad fact records left out) when any were."""
    out_dir = Path(out_dir)
    ids = list(ids) if ids is not None else None
    aggs = {}
    for kind in kind_names(kinds):
        results = load_cases(out_dir / "cases", kind, ids)
        if any(r.correct_prediction for r in results):
            aggs[kind] = aggregate_results(results, kind)
    summary = {kind: agg.summary() for kind, agg in aggs.items()}
    if skipped:
        summary["skipped_records"] = list(skipped)
    _write_json(out_dir / "summary.json", summary)
    if figures and aggs:
        plot_aie_heatmaps(aggs, out_dir / "aie_heatmap", modelname=modelname)
        plot_aie_lines(aggs, out_dir / "aie_lines", modelname=modelname)
    return summary


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=2)
