"""Tracing a set of known facts (the reference's `causal_trace.py` main loop), resumable.

One `.npz` per (fact, kind) under `out_dir/cases/`, named as the reference names them, each written
atomically; files already there are skipped, so a rerun resumes and Ctrl-C loses nothing that was
finished. Then the aggregate (summary.json and the AIE figures)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .. import distributed
from . import many
from .aggregate import aggregate_dir, case_path
from ..files import content_sha256, file_id, parse_json, read_text, write_json_atomic
from .api import DEFAULT_BACKEND, calculate_hidden_flow, check_fact_text, check_prompt, get_backend
from .kinds import get_kind, kind_names
from .noise import resolve_noise
from .plots import plot_trace_heatmap
from .results import TraceResult

KNOWN_FACTS_URL = "https://rome.baulab.info/data/dsets/known_1000.json"


def read_facts_file(path) -> list:
    """The records of a known-facts file (a JSON list, or an object with a "data" list), not yet
    checked. A missing file, a file that is not JSON and an empty list are errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"facts file not found: {path} (the known facts are at {KNOWN_FACTS_URL})")
    data = parse_json(read_text(path, "facts file"), path, "a list of fact records (known_1000 format)")
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of fact records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path} holds no fact records: nothing to trace")
    return data


def check_fact(record, position: int) -> dict:
    """One fact record checked (prompt, subject, attribute, id), with `known_id` set to its position
    when absent; a ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with 'prompt' and 'subject', got {type(record).__name__}")
    check_fact_text(record.get("prompt"), record.get("subject"))
    attribute = record.get("attribute")
    if attribute is not None and not isinstance(attribute, str):
        raise ValueError(f"attribute must be a string (the expected answer), got {attribute!r}")
    known_id = record.get("known_id", position)
    file_id(known_id, "known_id")
    return {**record, "known_id": known_id}


def check_facts(records: Sequence, check: Callable[[dict], object] | None = None
                ) -> tuple[list[dict], list[dict]]:
    """(facts, bad): the records that pass `check_fact` (and `check`, e.g. the model's checks of
    the prompt) and have a unique id, and one entry {"record": position, "known_id"?, "reason"}
    for every other record."""
    facts, bad = [], []
    for i, rec in enumerate(records):
        try:
            fact = check_fact(rec, i)
            if check is not None:
                check(fact)
            facts.append((i, fact))
        except ValueError as exc:
            bad.append(_bad_record(i, rec, str(exc)))
    positions: dict[str, list[int]] = {}
    for i, fact in facts:  # 7 and "7" name the same file
        positions.setdefault(file_id(fact["known_id"]), []).append(i)
    shared = {i: others for others in positions.values() if len(others) > 1 for i in others}
    for i, fact in facts:
        if i in shared:
            also = ", ".join(str(j) for j in shared[i] if j != i)
            bad.append(_bad_record(i, fact, f"duplicate known_id {fact['known_id']!r} (also record {also})"))
    bad.sort(key=lambda b: b["record"])
    return [fact for i, fact in facts if i not in shared], bad


def _bad_record(position: int, record, reason: str) -> dict:
    entry = {"record": position}
    if isinstance(record, dict) and "known_id" in record:
        entry["known_id"] = record["known_id"]
    entry["reason"] = reason
    return entry


def bad_records_error(source, bad: list[dict]) -> ValueError:
    """One error naming every bad record: a line each, after a first line saying what to do."""
    lines = [f"{source}: {len(bad)} bad fact record{'s' if len(bad) > 1 else ''} (fix "
             f"{'them' if len(bad) > 1 else 'it'}, or pass --skip-bad to trace the others and list "
             "them in summary.json):"]
    lines += [f"  record {b['record']}" + (f" (known_id {b['known_id']!r})" if "known_id" in b else "")
              + f": {b['reason']}" for b in bad]
    return ValueError("\n".join(lines))


def load_facts(path) -> list[dict]:
    """Known facts from a JSON list in the known_1000 format (keys known_id, subject, prompt,
    attribute, …), every record checked (`check_fact`); any bad record is an error naming every
    bad one. Records without `known_id` are numbered by position; `attribute` is optional
    (without it every prediction is accepted)."""
    facts, bad = check_facts(read_facts_file(path))
    if bad:
        raise bad_records_error(path, bad)
    return facts


def trace_one_fact(mt, fact: dict, cases_dir, kinds: Sequence[str] | str = "all", noise=0.1,
                   uniform_noise: bool = False, samples: int = 10, window: int = 10,
                   replace: bool = False, backend: str = DEFAULT_BACKEND,
                   whole_answer: bool = False) -> dict[str, bool]:
    """Trace one fact for each kind not yet on disk; returns {kind: True if computed now}.
    whole_answer: score the fact's whole `attribute` (see `calculate_hidden_flow`'s `answer`)
    instead of checking it against the clean top-1 token.

    The single place a batched engine would replace (it sees the fact and the kinds still due)."""
    kinds = kind_names(kinds)
    due = many.due_kinds(mt, cases_dir, fact, kinds)
    done = {}
    for kind in kinds:
        if kind not in due:
            done[kind] = False
            continue
        path = case_path(cases_dir, fact["known_id"], kind)
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
                figures: bool = True, case_plots: bool = False, skip_bad: bool = False,
                source: str = "facts", whole_answer: bool = False) -> dict:
    """Trace facts into `out_dir/cases/` (resuming), then aggregate into `out_dir`.

    noise: a rule ("s3" = 3σ with σ over *all* the given facts' subjects, as the reference; a
    number; "uX"; "tD"; "m" with `noise_texts`) or a resolved level/callable. The settings are
    recorded in `out_dir/run.json`; resuming with different settings is refused, since mixing
    them would corrupt the averages. Returns the aggregate summary.

    Under torchrun (after `rome_fast.distributed.init()`) each rank traces its share (whole fast
    batches, or facts [rank::world] on the reference backend) into the shared `out_dir`; rank 0
    records run.json first and aggregates after everyone is done, and returns the summary, the
    other ranks None.

    Every fact is checked first (`check_fact`; the prompt fits the model's context and is more than
    one token): bad ones are an error naming each, or with `skip_bad` are left out and listed in
    summary.json under "skipped_records" (`source` names the facts in messages). A finished case
    file is reused only if it holds the same fact's trace; one that does not load is traced again.
    whole_answer: score each fact's whole `attribute` (teacher-forced, the product of its tokens'
    probabilities) instead of the clean top-1 token; every fact is traced (one without an
    attribute is a bad record)."""
    records = list(facts)
    if not records:
        raise ValueError(f"{source}: no facts to trace")

    def check(f):
        check_prompt(mt, f["prompt"], f["subject"])
        if whole_answer:
            many.fact_answer(f)

    facts, bad = check_facts(records, check)
    if bad and not skip_bad:
        raise bad_records_error(source, bad)
    if not facts:
        raise ValueError(f"{source}: none of its {len(records)} records can be traced")
    kinds = kind_names(kinds)
    engine_of = get_backend(backend).engine
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 (how many facts to trace), got {limit!r}")
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
                    samples=samples, window=window, replace=bool(replace),
                    # what was read: another facts file (or corpus) in the same folder is refused
                    facts_sha256=content_sha256(facts),
                    noise_corpus_sha256=None if noise_texts is None else content_sha256(list(noise_texts)))
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
                         modelname=getattr(mt, "name", None), skipped=bad)


def _agree_run_settings(path: Path, settings: dict, info) -> dict:
    """run.json checked (or written) by rank 0, then checked by every other rank; returns the
    recorded settings."""
    distributed.agree_on_run_file(path, lambda write: _check_run_settings(path, settings, write), info,
                                  "another model, facts file or noise")
    return read_run_settings(path)


# hashes of what a run read; run.json files of earlier versions lack them (not a difference)
INPUT_HASHES = ("facts_sha256", "noise_corpus_sha256")


def read_run_settings(path) -> dict:
    """A trace folder's run.json; an unreadable one is an error naming it."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): not a trace run's settings") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} does not hold a trace run's settings (a JSON object)")
    return settings


def _check_run_settings(path: Path, settings: dict, write: bool = True) -> None:
    if path.is_file():
        old = read_run_settings(path)
        diff = {k: (old.get(k), v) for k, v in settings.items()
                if not (k in INPUT_HASHES and k not in old) and not _same_setting(old.get(k), v)}
        if diff:
            inputs = [k for k in diff if k in INPUT_HASHES]
            why = f" ({' and '.join(inputs)}: the input differs from the first run's)" if inputs else ""
            raise ValueError(f"{path.parent} holds a run with other settings {diff} (was, now){why}: "
                             "use another output folder")
        return
    if not write:
        raise ValueError(f"{path} is missing")
    write_json_atomic(path, settings, indent=2)


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
