"""The evaluation loop (REFERENCE.md §4.1) and its summary.

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
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import distributed
from . import generation as G
from . import metrics as M
from ..files import file_id, file_sha256, inside
from .datasets import EvalRecord, load_dataset

Restore = Callable[[], None]
Editor = Callable[[object, dict], Restore]  # edit(mt, request) -> restore()

GEN_SOURCE_COMPACT = "rewrite prompt + paraphrase, 1 sample each (compact records)"
GEN_SOURCE_FULL = "generation_prompts, 1 sample each"


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
# Metrics of one record on the model as it is

def generation_prompts(record: EvalRecord) -> list[str]:
    if record.generation_prompts:
        return list(record.generation_prompts)
    return [record.rewrite_prompt] + list(record.paraphrase_prompts)


def case_metrics(mt, record: EvalRecord, skip_generation: bool = False, seed: int = 0,
                 tfidf: Optional[G.TfIdf] = None, snippets: Optional[dict] = None,
                 batch_size: int = M.DEFAULT_BATCH) -> dict:
    """CounterFact: NLLs of new/true per prompt kind (+ generations, GE, and RS / essence score
    when TF-IDF and snippets are given); zsRE: teacher-forced token accuracies."""
    model, tok = mt.model, mt.tokenizer
    if record.dataset == "zsre":
        return M.zsre_correct(model, tok, record, batch_size)
    out = M.counterfact_probs(model, tok, record, batch_size)
    if skip_generation:
        return out
    texts = G.generate(model, tok, generation_prompts(record), max_out_len=100, top_k=5,
                       seed=seed + record.case_id)
    out["ngram_entropy"] = G.n_gram_entropy(texts)
    out["text"] = texts
    rr = record.requested_rewrite
    rid, tid = rr.get("relation_id"), rr.get("target_new", {}).get("id")
    if snippets is not None and rid is not None and tid is not None:
        samples = snippets.get(rid, {}).get(tid, [])
        if tfidf is not None and samples:
            out["reference_score"] = tfidf.similarity(" ".join(texts), " ".join(s["text"] for s in samples))
        essence = [s["text"] for s in samples if s.get("name") == record.subject]
        if essence:
            out["essence_score"] = G.perplexity(model, tok, " ".join(essence), max_input_length=100)
            out["essence_text"] = essence
    return out


# ---------------------------------------------------------------------------------------------
# The loop

def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def case_path(out_dir, case_id: int) -> Path:
    """out_dir/case_{id}.json; the id must be a non-negative integer (it becomes a file name)."""
    return inside(out_dir, Path(out_dir) / f"case_{file_id(case_id, 'case_id', names=False)}.json")


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


def _check_run_config(out_dir: Path, config: dict, write: bool = True) -> None:
    """Refuse to mix cases of different runs (another model or dataset) in one folder."""
    path = out_dir / "run.json"
    if not write and not path.is_file():
        raise RuntimeError(f"{path} is missing")
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("dataset", "model", "skip_generation", "seed", "backend", "hparams", "key_mode",
                    "sequential", "data_sha256"):
            if key == "data_sha256" and (key not in old or config.get(key) is None):
                continue  # a run.json of an earlier version, or records passed in without their file
            if key in old and old[key] != config.get(key):
                raise ValueError(f"{out_dir} holds a run with {key}={old[key]!r}, not {config.get(key)!r}; "
                                 "use another --out folder (or delete this one) to start afresh")
    if write:
        _write_json_atomic(path, config)


def _agree_run_config(out_dir: Path, config: dict, info) -> None:
    """run.json checked (or written) by rank 0, then checked by every other rank."""
    distributed.agree_on_run_file(out_dir / "run.json", lambda write: _check_run_config(out_dir, config, write),
                                  info, "another model, dataset or hparams")


def _run_config(mt, dataset, records, hparams, skip_generation, seed, backend, extra: dict) -> dict:
    """What run.json records of a run: what must agree for its cases to belong together."""
    return {**extra, "dataset": dataset, "model": getattr(mt, "name", type(mt.model).__name__),
            "skip_generation": bool(skip_generation), "seed": seed, "backend": backend,
            "hparams": hparams.to_dict() if hasattr(hparams, "to_dict") else None,
            "generation": None if skip_generation or dataset == "zsre" else
            {"max_out_len": 100, "top_k": 5, "seed": "seed + case_id",
             "prompts": GEN_SOURCE_FULL if any(r.generation_prompts for r in records) else GEN_SOURCE_COMPACT}}


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
             summary: bool = True, sequential: bool = False, data_sha256: Optional[str] = None) -> Optional[dict]:
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
    if editor is None:
        editor = rome_editor(hparams, backend, **(editor_kwargs or {}))
    check = _debug_default() if check_restore is None else check_restore
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = distributed.current()
    extra = {} if data_sha256 is None else {"data_sha256": data_sha256}  # another data file is refused
    if (editor_kwargs or {}).get("key_mode", "reference") != "reference":
        extra["key_mode"] = editor_kwargs["key_mode"]
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
    kw = dict(skip_generation=skip_generation, seed=seed, tfidf=tfidf, snippets=snippets, batch_size=batch_size)
    first_restore = None
    try:
        for n, record in enumerate(tqdm(records, desc=f"eval {dataset} (sequential)", unit="case",
                                        disable=not progress), 1):
            pre = case_metrics(mt, record, **kw)  # the model with the earlier cases' edits
            restore, elapsed = _timed_edit(editor, mt, record)
            first_restore = first_restore or restore  # puts back the weights from before every edit
            post = case_metrics(mt, record, **kw)
            _write_json_atomic(case_path(out_dir, record.case_id),
                               {"case_id": record.case_id, "requested_rewrite": record.requested_rewrite,
                                "time": elapsed, "edits": n, "post": post, "pre": pre})
    finally:
        if first_restore is not None:
            first_restore()
    return summarize(out_dir, print_table=progress) if summary else None


# ---------------------------------------------------------------------------------------------
# Summary

def _load_cases(out_dir: Path) -> list[dict]:
    cases = []
    for p in out_dir.glob("case_*.json"):
        try:
            cases.append(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:  # cannot come from our atomic writes
            raise ValueError(f"{p} is not valid JSON ({exc}); delete it and rerun that case") from None
    return sorted(cases, key=lambda c: c["case_id"])


def summarize(out_dir, print_table: bool = True) -> dict:
    """Aggregate the case files of a run into {dataset, n, pre, post, time, notes}, each metric
    as {mean, std, ci95, n} in % (GE ×100 as in the paper; S the harmonic mean of ES, PS, NS).
    Written to out_dir/summary.json and, with print_table, printed."""
    out_dir = Path(out_dir)
    cases = _load_cases(out_dir)
    if not cases:
        raise FileNotFoundError(f"no case_*.json files in {out_dir}")
    zsre = "rewrite_prompts_correct" in cases[0]["post"]
    per_case = M.zsre_case_scores if zsre else M.counterfact_case_scores
    keys = M.ZSRE_KEYS if zsre else M.CF_KEYS
    result = {"dataset": "zsre" if zsre else "counterfact", "n": len(cases), "dir": str(out_dir)}
    for phase in ("pre", "post"):
        result[phase] = M.aggregate([per_case(c[phase]) for c in cases], keys)
    result["time"] = M.mean_std_ci([c["time"] for c in cases], scale=1.0)
    run = out_dir / "run.json"
    if run.is_file():
        cfg = json.loads(run.read_text(encoding="utf-8"))
        result["model"] = cfg.get("model")
        if cfg.get("generation"):
            result["notes"] = {"GE": "n-gram entropy ×100 of generations from " + cfg["generation"]["prompts"]}
    _write_json_atomic(out_dir / "summary.json", result)
    if print_table:
        print(format_summary(result))
    return result


def format_summary(s: dict) -> str:
    """The summary as a table: mean (95 % CI) per metric, rows pre / post."""
    cols = (["Efficacy", "Paraphrase", "Specificity"] if s["dataset"] == "zsre" else
            ["S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS"])
    cols = [c for c in cols if any(c in s[p] for p in ("pre", "post"))]

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):  # S: a single number
            return f"{v:.1f}"
        return f"{v['mean']:.1f} ({v['ci95']:.1f})"

    rows = [[""] + cols] + [[p] + [cell(s[p].get(c)) for c in cols] for p in ("pre", "post")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{s['dataset']}: {s['n']} cases in {s['dir']}" +
             (f", model {s['model']}" if s.get("model") else "")]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
    lines.append(f"edit time {s['time']['mean']:.2f} s/case; values ×100, 95 % CI in parentheses")
    for k, v in (s.get("notes") or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _main_summarize(argv: Sequence[str] = ()) -> int:  # python -m rome_fast.eval.runner DIR
    for d in argv:
        summarize(d)
    return 0


if __name__ == "__main__":
    sys.exit(_main_summarize(sys.argv[1:]))
