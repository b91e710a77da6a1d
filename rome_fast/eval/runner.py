"""The evaluation loop of one edit at a time (docs/memit.md §4 for both protocols); the metrics, files
and summary of a case are in cases.py.

Per record: edit (timed) → "post" metrics → restore the weights → "pre" metrics → write
`case_{id}.json` ({case_id, requested_rewrite, time, post, pre}) atomically. Cases whose file
exists are skipped, so a run can be interrupted (Ctrl-C) and resumed; the weights are restored
even when a case fails half-way.

Generation is seeded per case (seed + case_id, the same seed pre and post), so a resumed run
writes the same files as an uninterrupted one and pre/post texts differ only through the edit.
Compact CounterFact records have no generation prompts; for them GE is measured on one sample
from the rewrite prompt and one from the paraphrase (the reference uses 10 generation prompts
of the full records, so GE here is comparable in kind, not in exact value).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import distributed
from . import generation as G
from . import metrics as M
from ..files import file_sha256
from .cases import (_check_run_config, _run_config, _write_json_atomic, case_metrics, case_path,
                    format_summary, summarize)  # noqa: F401  (format_summary: runner's API before cases.py)
from .datasets import load_dataset

Restore = Callable[[], None]
Editor = Callable[[object, dict], Restore]  # edit(mt, request) -> restore()


def rome_editor(hparams, backend: Optional[str] = None, **kwargs) -> Editor:
    """The default editor: `rome_fast.edit.apply_rome_to_model` on one request, in place,
    returning a function that restores the original weights. `backend` ("reference" / "fast")
    and any keyword (e.g. stats_dir) go to apply_rome_to_model."""
    if hparams is None:
        raise ValueError("the ROME editor needs hyperparameters (ROMEHyperParams.from_name(...))")
    if backend is not None:
        kwargs["backend"] = backend

    def edit(mt, request):
        from rome_fast.edit import apply_rome_to_model, restore_weights
        _, orig = apply_rome_to_model(mt.model, mt.tokenizer, [request], hparams, copy=False,
                                      return_orig_weights=True, **kwargs)
        return lambda: restore_weights(mt.model, orig)

    return edit


def weights_checksum(model) -> list:
    """Per-parameter float64 sum and norm: cheap (one pass, no copies) and changed by any
    realistic edit (a rank-one update moves both)."""
    with torch.no_grad():
        return [(torch.sum(p, dtype=torch.float64).item(),
                 torch.linalg.vector_norm(p, dtype=torch.float64).item())
                for p in model.parameters()]


def _debug_default() -> bool:
    return os.environ.get("ROME_FAST_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# The loop

def _finished(path: Path, record) -> bool:
    """Whether `path` holds `record`'s finished case. A file that does not parse is computed again
    (said in one line); one holding another request is a ValueError (the folder holds another data
    file's cases, which must not be mixed with these)."""
    if not path.exists():
        return False
    try:
        case = json.loads(path.read_text(encoding="utf-8"))
        stored = case["requested_rewrite"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        print(f"rome-fast: {path} does not load ({type(exc).__name__}: {exc}); evaluating it again",
              file=sys.stderr)
        return False
    if stored != record.request():  # as the file stores it (a JSON copy)
        raise ValueError(f"{path} holds another request than case {record.case_id} ({stored!r}): the folder "
                         "holds the cases of other data; use another --out folder")
    return True


def _agree_run_config(out_dir: Path, config: dict, info) -> None:
    """run.json checked (or written) by rank 0, then checked by every other rank."""
    distributed.agree_on_run_file(out_dir / "run.json", lambda write: _check_run_config(out_dir, config, write),
                                  info, "another model, dataset or hparams")


def _timed_edit(editor, mt, record):
    """(restore, seconds) of one edit; the editor must hand back a restore function."""
    start = time.perf_counter()
    restore = editor(mt, record.request())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if not callable(restore):
        raise TypeError(f"the editor must return a restore function, got {type(restore).__name__}")
    return restore, elapsed


def evaluate(mt, dataset: str, records, hparams, out_dir, limit: Optional[int] = None,
             editor: Optional[Editor] = None, skip_generation: bool = False, progress: bool = True,
             *, seed: int = 0, check_restore: Optional[bool] = None, tfidf: Optional[G.TfIdf] = None,
             snippets: Optional[dict] = None, backend: Optional[str] = None,
             editor_kwargs: Optional[dict] = None, batch_size: int = M.DEFAULT_BATCH,
             summary: bool = True, sequential: bool = False, method: str = "rome",
             num_edits: Optional[int] = None, generation_interval: int = 1,
             data_sha256: Optional[str] = None, eval_every: Optional[int] = None,
             stop_on_collapse: Optional[float] = None, pre: bool = True) -> Optional[dict]:
    """Evaluate edits of `records` (EvalRecords or a data file path) on `mt` and write the case
    files to `out_dir`; returns `summarize(out_dir)` (None with summary=False).

    editor: `edit(mt, request) -> restore()`; default: ROME via rome_fast.edit with `hparams`
    (and `backend`, `editor_kwargs`). check_restore: verify after each case that a checksum of
    all weights equals the one before the edit (default: the ROME_FAST_DEBUG environment
    variable). tfidf / snippets: enable RS and the essence score (full CounterFact records).

    Under torchrun (after `rome_fast.distributed.init()`) each rank evaluates records[rank::world]
    into the shared `out_dir`; rank 0 writes run.json first and the summary once every rank is
    done, and returns it; the other ranks return None.

    sequential=True: the edits accumulate (no restore between cases, as a model edited fact after
    fact): per case, "pre" is measured on the model with the earlier cases' edits and "post" after
    this one's ("edits" counts them); the original weights come back at the end. One process
    only, and not resumable (the accumulated edits are not saved): `out_dir` must hold no cases.

    num_edits=N (or a method other than "rome"): the mass-editing protocol of `chunked.py`:
    records in chunks of N edited together (`sequential`: chunks accumulate, resumably), with
    the teacher-forced accuracies; `editor` is then `edit(mt, requests) -> original weights`.
    generation_interval=k: generation metrics only for records with case_id % k == 0.
    With num_edits and sequential (AlphaEdit's protocol): the batches are applied one after another
    under the collapse monitor (monitor.json), and every record is measured after the last one;
    eval_every=k also measures the records edited so far after every k-th batch;
    stop_on_collapse=KL ends the run when the monitor's KL exceeds it; pre=False skips measuring
    the unedited model.

    data_sha256: the data file's sha256 (computed here when `records` is a path), kept in run.json
    so a resumed run on another data file is refused; a case file is reused only if it holds the
    same request, and one that does not parse is evaluated again."""
    if dataset not in ("counterfact", "zsre"):
        raise ValueError(f"unknown dataset {dataset!r}; use 'counterfact' or 'zsre'")
    if isinstance(records, (str, Path)):
        data_sha256 = data_sha256 or file_sha256(records)
        records = load_dataset(dataset, records, limit)
    records = list(records)[:limit]
    for r in records:
        if r.dataset != dataset:
            raise ValueError(f"case {r.case_id} is a {r.dataset} record, not {dataset}")
    extra = {} if data_sha256 is None else {"data_sha256": data_sha256}  # another data file is refused
    if (editor_kwargs or {}).get("key_mode", "reference") != "reference":
        extra["key_mode"] = editor_kwargs["key_mode"]
    if num_edits is not None or method != "rome":
        from .chunked import evaluate_chunks
        return evaluate_chunks(mt, dataset, records, hparams, out_dir, method=method, num_edits=num_edits or 1,
                               sequential=sequential, editor=editor, backend=backend, editor_kwargs=editor_kwargs,
                               skip_generation=skip_generation, generation_interval=generation_interval, seed=seed,
                               tfidf=tfidf, snippets=snippets, batch_size=batch_size, progress=progress,
                               summary=summary, config_extra=extra, eval_every=eval_every,
                               stop_on_collapse=stop_on_collapse, pre=pre)
    if editor is None:
        editor = rome_editor(hparams, backend, **(editor_kwargs or {}))
    check = _debug_default() if check_restore is None else check_restore
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = distributed.current()
    if sequential:
        if info.distributed:
            raise ValueError("sequential evaluation accumulates edits on one model: run it in one "
                             "process, not under torchrun")
        if any(out_dir.glob("case_*.json")):
            raise ValueError(f"{out_dir} already holds case files: a sequential run is not resumable "
                             "(its accumulated edits are not saved); use an empty --out")
        return _evaluate_sequential(mt, dataset, records, hparams, out_dir, editor, skip_generation,
                                    progress, seed, tfidf, snippets, backend, batch_size, summary, extra)
    _agree_run_config(out_dir, _run_config(mt, dataset, records, hparams, skip_generation, seed, backend,
                                           extra), info)
    fail = distributed.failure_hook("case", info)
    # Rank 0 edits first, the others wait: what an editor computes and caches on first use (ROME's
    # second-moment statistics) is then computed once, not by every rank at the same time.
    first_pending = info.distributed
    if first_pending and not info.is_main:
        distributed.barrier()

    from tqdm.auto import tqdm
    bar = tqdm(distributed.shard(records, info), desc=f"eval {dataset}", unit="case", disable=not progress)
    done = skipped = 0
    for record in bar:
        path = case_path(out_dir, record.case_id)
        if _finished(path, record):
            skipped += 1
            bar.set_postfix(done=done, skipped=skipped)
            continue
        kw = dict(skip_generation=skip_generation, seed=seed, tfidf=tfidf, snippets=snippets,
                  batch_size=batch_size)
        before = weights_checksum(mt.model) if check else None
        restore, elapsed = _timed_edit(editor, mt, record)
        try:
            post = case_metrics(mt, record, **kw)
        finally:  # the model must not stay edited, whatever happened
            restore()
        if check and weights_checksum(mt.model) != before:
            raise RuntimeError(f"case {record.case_id}: the weights differ from the original after "
                               "restoring; the editor's restore function is broken")
        pre = case_metrics(mt, record, **kw)
        _write_json_atomic(path, {"case_id": record.case_id,
                                  "requested_rewrite": record.requested_rewrite,
                                  "time": elapsed, "post": post, "pre": pre})
        done += 1
        bar.set_postfix(done=done, skipped=skipped)
        if first_pending and info.is_main:
            distributed.barrier()
            first_pending = False
        if fail is not None:
            fail()
    bar.close()
    if first_pending and info.is_main:  # rank 0 had nothing left to do
        distributed.barrier()
    distributed.barrier()  # every rank's cases are written
    if not info.is_main:
        return None
    return summarize(out_dir, print_table=progress) if summary else None


def _evaluate_sequential(mt, dataset, records, hparams, out_dir, editor, skip_generation, progress,
                         seed, tfidf, snippets, backend, batch_size, summary, extra):
    from tqdm.auto import tqdm
    _check_run_config(out_dir, _run_config(mt, dataset, records, hparams, skip_generation, seed, backend,
                                           {**extra, "sequential": True}))
    from .monitor import CollapseMonitor, write_monitor
    kw = dict(skip_generation=skip_generation, seed=seed, tfidf=tfidf, snippets=snippets, batch_size=batch_size)
    monitor = CollapseMonitor(mt, seed=seed)  # one batch per edit here
    watched = [mt.adapter.rewrite_weight_name(l) for l in getattr(hparams, "layers", [])]
    batches, first_restore = [], None
    try:
        for n, record in enumerate(tqdm(records, desc=f"eval {dataset} (sequential)", unit="case",
                                        disable=not progress), 1):
            pre = case_metrics(mt, record, **kw)  # the model with the earlier cases' edits
            before = {w: mt.model.get_parameter(w).detach().clone() for w in watched}
            restore, elapsed = _timed_edit(editor, mt, record)
            first_restore = first_restore or restore  # puts back the weights from before every edit
            post = case_metrics(mt, record, **kw)
            _write_json_atomic(case_path(out_dir, record.case_id),
                               {"case_id": record.case_id, "requested_rewrite": record.requested_rewrite,
                                "time": elapsed, "edits": n, "post": post, "pre": pre})
            batches.append(monitor.measure(mt, n - 1, n, before, elapsed))
            write_monitor(out_dir, monitor.header(), batches)
    finally:
        if first_restore is not None:
            first_restore()
    return summarize(out_dir, print_table=progress) if summary else None


def _main_summarize(argv: Sequence[str] = ()) -> int:  # python -m rome_fast.eval.runner DIR
    for d in argv:
        summarize(d)
    return 0


if __name__ == "__main__":
    sys.exit(_main_summarize(sys.argv[1:]))
