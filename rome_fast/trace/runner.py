"""Tracing a set of known facts (the reference's `causal_trace.py` main loop), resumable.

One `.npz` per (fact, kind) under `out_dir/cases/`, named as the reference names them, each written
atomically; files already there are skipped, so a rerun resumes and Ctrl-C loses nothing that was
finished. Then the aggregate (summary.json and the AIE figures)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .. import distributed
from . import many
from .aggregate import aggregate_dir, case_path
from .api import DEFAULT_BACKEND, calculate_hidden_flow, get_backend
from .kinds import get_kind, kind_names
from .noise import resolve_noise
from .plots import plot_trace_heatmap
from .results import TraceResult

KNOWN_FACTS_URL = "https://rome.baulab.info/data/dsets/known_1000.json"


def load_facts(path) -> list[dict]:
    """Known facts from a JSON list in the known_1000 format (keys known_id, subject, prompt,
    attribute, …). Records without `known_id` are numbered by position; `attribute` is optional
    (without it every prediction is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"facts file not found: {path} (the known facts are at {KNOWN_FACTS_URL})")
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of fact records")
    facts = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not rec.get("prompt") or not rec.get("subject"):
            raise ValueError(f"{path}: record {i} needs non-empty 'prompt' and 'subject'")
        if rec["subject"] not in rec["prompt"]:
            raise ValueError(f"{path}: record {i}: subject {rec['subject']!r} is not in its prompt")
        facts.append({**rec, "known_id": rec.get("known_id", i)})
    ids = [f["known_id"] for f in facts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: known_id values are not unique")
    return facts


def trace_one_fact(mt, fact: dict, cases_dir, kinds: Sequence[str] | str = "all", noise=0.1,
                   uniform_noise: bool = False, samples: int = 10, window: int = 10,
                   replace: bool = False, backend: str = DEFAULT_BACKEND,
                   whole_answer: bool = False) -> dict[str, bool]:
    """Trace one fact for each kind not yet on disk; returns {kind: True if computed now}.
    whole_answer: score the fact's whole `attribute` (see `calculate_hidden_flow`'s `answer`)
    instead of checking it against the clean top-1 token.

    The single place a batched engine would replace (it sees the fact and the kinds still due)."""
    done = {}
    for kind in kind_names(kinds):
        path = case_path(cases_dir, fact["known_id"], kind)
        if path.is_file():
            done[kind] = False
            continue
        answer = {"answer": many.fact_answer(fact)} if whole_answer else {"expect": fact.get("attribute")}
        result = calculate_hidden_flow(mt, fact["prompt"], fact["subject"], samples=samples, noise=noise,
                                       uniform_noise=uniform_noise, replace=replace, window=window,
                                       kind=kind, backend=backend, **answer)
        TraceResult.from_dict(result).save(path)
        done[kind] = True
    return done


def trace_facts(mt, facts: Iterable[dict], out_dir, kinds: Sequence[str] | str = "all", noise="s3",
                samples: int = 10, window: int = 10, limit: int | None = None,
                backend: str = DEFAULT_BACKEND, progress: bool = True, replace: bool = False,
                uniform_noise: bool = False, noise_texts: Sequence[str] | None = None,
                figures: bool = True, case_plots: bool = False, whole_answer: bool = False) -> dict:
    """Trace facts into `out_dir/cases/` (resuming), then aggregate into `out_dir`.

    noise: a rule ("s3" = 3σ with σ over *all* the given facts' subjects, as the reference; a
    number; "uX"; "tD"; "m" with `noise_texts`) or a resolved level/callable. The settings are
    recorded in `out_dir/run.json`; resuming with different settings is refused, since mixing
    them would corrupt the averages. Returns the aggregate summary.

    Under torchrun (after `rome_fast.distributed.init()`) each rank traces its share (whole fast
    batches, or facts [rank::world] on the reference backend) into the shared `out_dir`; rank 0
    records run.json first and aggregates after everyone is done, and returns the summary, the
    other ranks None. whole_answer: score each fact's whole `attribute` (teacher-forced, the product
    of its tokens' probabilities) instead of the clean top-1 token; every fact is traced."""
    facts = list(facts)
    if whole_answer:
        for f in facts:
            many.fact_answer(f)  # every fact has an answer to score, before anything runs
    kinds = kind_names(kinds)
    engine_of = get_backend(backend).engine
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
    todo = facts if limit is None else facts[:limit]
    if isinstance(noise, str) or (isinstance(noise, (int, float)) and not isinstance(noise, bool)):
        rule = str(noise)
        level, uniform = resolve_noise(noise, mt, [f["subject"] for f in facts], texts=noise_texts)
        uniform_noise = uniform_noise or uniform
    else:
        rule, level = getattr(noise, "__name__", "custom"), noise
    out_dir = Path(out_dir)
    cases = out_dir / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    settings = dict(model=getattr(mt, "name", ""), noise_rule=rule,
                    noise_level=level if isinstance(level, float) else None, uniform_noise=uniform_noise,
                    samples=samples, window=window, replace=bool(replace))
    if whole_answer:  # recorded only when set, so runs from before the option still resume
        settings["whole_answer"] = True
    info = distributed.current()
    recorded = _agree_run_settings(out_dir / "run.json", settings, info)
    if isinstance(level, float) and isinstance(recorded.get("noise_level"), float):
        level = recorded["noise_level"]  # every rank and every resume: the same σ, to the bit
    fail = distributed.failure_hook("batch" if engine_of is not None else "fact", info)

    if engine_of is not None:  # facts in batches on the engine, every kind in one call
        engine = engine_of(mt)
        # a rank's share is whole batches of the one-process split: the same company, the same bits
        batches = distributed.shard(many.fact_batches(mt, todo, many.default_facts_per_batch(engine)), info)
        many.trace_facts_batched(mt, todo, cases, kinds, noise=level, uniform_noise=uniform_noise,
                                 samples=samples, window=window, replace=replace, progress=progress,
                                 engine=engine, batches=batches, after_batch=fail, whole_answer=whole_answer)
        mine = [todo[i] for b in batches for i in b]
        if case_plots:
            for fact in mine:
                _case_plots(out_dir, fact["known_id"], kinds, getattr(mt, "name", None))
    else:
        from tqdm import tqdm
        mine = distributed.shard(todo, info)
        bar = tqdm(mine, desc="causal trace", unit="fact", disable=not progress)
        for fact in bar:
            bar.set_postfix_str(str(fact["subject"])[:24])
            done = trace_one_fact(mt, fact, cases, kinds, noise=level, uniform_noise=uniform_noise,
                                  samples=samples, window=window, replace=replace, backend=backend,
                                  whole_answer=whole_answer)
            if case_plots:
                _case_plots(out_dir, fact["known_id"], kinds, getattr(mt, "name", None))
            if fail is not None and any(done.values()):
                fail()
    distributed.barrier()  # every rank's files are written
    if not info.is_main:
        return None
    return aggregate_dir(out_dir, kinds, ids=[f["known_id"] for f in todo], figures=figures,
                         modelname=getattr(mt, "name", None))


def _agree_run_settings(path: Path, settings: dict, info) -> dict:
    """run.json checked (or written) by rank 0, then checked by every other rank; returns the
    recorded settings."""
    distributed.agree_on_run_file(path, lambda write: _check_run_settings(path, settings, write), info,
                                  "another model, facts file or noise")
    return json.loads(path.read_text())


def _check_run_settings(path: Path, settings: dict, write: bool = True) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if not _same_setting(old.get(k), v)}
        if diff:
            raise ValueError(f"{path.parent} holds a run with other settings {diff} (was, now): "
                             "use another output folder")
        return
    if not write:
        raise ValueError(f"{path} is missing")
    fd, tmp = tempfile.mkstemp(prefix=".run.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)


def _same_setting(a, b) -> bool:
    # σ measured on another device may differ in the last bits; that is the same run
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    return a == b


def _case_plots(out_dir: Path, known_id, kinds, modelname) -> None:
    """The reference draws a heat map per fact for known_id <= 200 (in pdfs/)."""
    if not isinstance(known_id, int) or known_id > 200:
        return
    for kind in kinds:
        r = TraceResult.load(case_path(out_dir / "cases", known_id, kind))
        if not r.correct_prediction:
            continue
        answer = re.sub(r"[^\w.\-]+", "_", r.answer.strip()) or "_"
        target = out_dir / "pdfs" / f"{answer}_{known_id}{get_kind(kind).suffix}.pdf"
        if not target.is_file():
            plot_trace_heatmap(r, savepdf=target, modelname=modelname)
