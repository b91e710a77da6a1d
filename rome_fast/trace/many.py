"""Tracing a fact set on the fast engine: facts in length-sorted batches, one engine call per
batch for every kind still due, each (fact, kind) result written atomically as soon as its batch is
done (a crash or Ctrl-C loses at most the batch in flight), finished files skipped on a rerun."""
from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

from ..tokens import find_token_range
from .aggregate import case_path
from .api import fact_dict, make_fact_input
from .engine import TraceEngine
from .results import ResultFileError, TraceResult


def due_kinds(mt, cases_dir, fact: dict, kinds: Sequence[str]) -> list[str]:
    """The kinds of `fact` still to trace: those without a finished case file. A file that does not
    load is traced again (said in one line); one that holds another fact's trace is a ValueError
    (the folder holds another facts file's results, which must not be mixed with these)."""
    due = []
    for kind in kinds:
        path = case_path(cases_dir, fact["known_id"], kind)
        if not path.is_file():
            due.append(kind)
            continue
        try:
            result = TraceResult.load(path)
        except ResultFileError as exc:
            print(f"rome-fast: {exc.path}: {exc.reason}; tracing it again", file=sys.stderr)
            due.append(kind)
            continue
        differs = _other_fact(mt, result, fact)
        if differs:
            raise ValueError(f"{path} holds the trace of another fact ({differs}) than known_id "
                             f"{fact['known_id']} ({fact['prompt']!r}): the folder holds the results of other "
                             "facts; use another output folder")
    return due


def _other_fact(mt, r: TraceResult, fact: dict) -> str | None:
    """What shows that a stored result is not `fact`'s trace, or None: its tokens, its subject's
    tokens, or its prediction check against the fact's expected attribute."""
    ids = mt.tokenizer.encode(fact["prompt"])
    if r.input_ids is not None and r.input_ids.tolist() != ids:
        return "other prompt tokens"
    if r.correct_prediction and r.subject_range is not None and \
            tuple(r.subject_range) != find_token_range(mt.tokenizer, ids, fact["subject"]):
        return "another subject"
    expect = fact.get("attribute")
    if expect is not None and r.answer is not None and (r.answer.strip() == expect) != r.correct_prediction:
        return "another expected answer"
    return None


def fact_answer(fact: dict) -> str:
    """The answer a whole-answer trace scores: the fact's `attribute`."""
    answer = fact.get("attribute")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"fact {fact.get('known_id')!r} has no 'attribute' to score as its whole answer")
    return answer


def default_facts_per_batch(engine: TraceEngine) -> int:
    """Facts per engine call: enough rows to fill a GPU, few on a CPU (whose passes are already
    compute-bound at a few thousand tokens)."""
    return 32 if engine.device.type == "cuda" else 4


def fact_batches(mt, facts: Sequence[dict], per_batch: int) -> list[list[int]]:
    """Indices of `facts` in length-sorted batches. The batches depend only on the fact list, not on
    what is already done, so a resumed run (or another process's share of the batches) computes
    every fact in the same company, with the same padding: the same bits."""
    lengths = [len(mt.tokenizer.encode(f["prompt"])) for f in facts]
    order = sorted(range(len(facts)), key=lambda i: (lengths[i], i))
    return [order[s:s + per_batch] for s in range(0, len(order), per_batch)]


def trace_facts_batched(mt, facts: Sequence[dict], cases_dir, kinds: Sequence[str], noise,
                        uniform_noise: bool = False, samples: int = 10, window: int = 10,
                        replace: bool = False, progress: bool = True, engine: TraceEngine | None = None,
                        facts_per_batch: int | None = None, batches: Sequence[Sequence[int]] | None = None,
                        after_batch: Callable[[], None] | None = None, whole_answer: bool = False) -> int:
    """Trace every (fact, kind) not yet on disk; returns how many files were written. A batch's
    files are written together once it is done (each atomically). `batches` restricts the run to
    some of `fact_batches(...)` (a process's share); `after_batch` is called once each computed
    batch's files are written. whole_answer: score each fact's whole `attribute` instead of
    checking it against the clean top-1 token (see runner.trace_facts)."""
    from tqdm import tqdm

    engine = engine or TraceEngine(mt)
    if batches is None:
        batches = fact_batches(mt, facts, facts_per_batch or default_facts_per_batch(engine))
    due = {i: due_kinds(mt, cases_dir, facts[i], kinds) for b in batches for i in b}
    todo = [[i for i in b if due[i]] for b in batches]
    n_total = sum(len(b) for b in batches)
    n_todo = sum(len(b) for b in todo)
    bar = tqdm(total=n_total, initial=n_total - n_todo, desc="causal trace (fast)", unit="fact",
               disable=not progress)
    written, t0, done_now = 0, time.perf_counter(), 0
    for idx in (b for b in todo if b):
        inputs = {i: make_fact_input(mt, facts[i]["prompt"], facts[i]["subject"], samples, noise,
                                     uniform_noise, answer=fact_answer(facts[i]) if whole_answer else None)
                  for i in idx}
        checks = [] if whole_answer else engine.trace([inputs[i] for i in idx], kinds=(), window=window)
        results, traced = {}, list(idx) if whole_answer else []
        for i, res in zip(idx, checks):
            expect = facts[i].get("attribute")
            if expect is not None and mt.tokenizer.decode([res.answer]).strip() != expect:
                # the reference stores the failed check and moves on
                results.update({(i, k): fact_dict(mt, inputs[i], res, k, window, traced=False)
                                for k in due[i]})
            else:
                traced.append(i)
        if traced:
            kinds_due = [k for k in kinds if any(k in due[i] for i in traced)]
            for i, res in zip(traced, engine.trace([inputs[i] for i in traced], kinds=kinds_due,
                                                   window=window, replace=replace)):
                results.update({(i, k): fact_dict(mt, inputs[i], res, k, window) for k in due[i]})
                if whole_answer:  # the whole answer scored, not its first token
                    for k in due[i]:
                        results[(i, k)]["answer"] = mt.tokenizer.decode(res.answer_ids)
        for (i, kind), result in results.items():
            TraceResult.from_dict(result).save(case_path(cases_dir, facts[i]["known_id"], kind))
            written += 1
        done_now += len(idx)
        if after_batch is not None:
            after_batch()
        bar.update(len(idx))
        bar.set_postfix_str(f"{done_now / (time.perf_counter() - t0):.2f} facts/s")
    bar.close()
    return written
