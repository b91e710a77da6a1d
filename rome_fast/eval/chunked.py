"""Mass-editing evaluation: records in consecutive chunks of N edits (docs/memit.md §Evaluation).

Default (MultiCounterFact semantics): each chunk is applied together to the original model, every
record of the chunk is measured on the edited model ("post"), the weights are restored, and the
records are measured again ("pre"). `sequential=True`: chunks accumulate; "pre" is the model
before the chunk (with the earlier chunks' edits), "post" after it; the original weights come back
at the end. Within a chunk, --method rome applies the requests one after another; MEMIT (and any
batch method) solves them together.

Conflicts: a record whose (subject, prompt) equals an earlier record's of the same chunk but asks
for another target is dropped (the later one), as MultiCounterFact removes conflicting
(subject, relation) pairs; the count is in each chunk's chunk.json, the summary and on stdout.

Files, atomically per chunk: out/chunk_00003/ holds case_{id}.json of the chunk's records and
chunk.json (ids, dropped, edit seconds); it is written under a temporary name and renamed, so a
chunk's files appear together or not at all, and a rerun skips finished chunks. A sequential run
also saves there its edit state after the chunk (state.safetensors: the current values of every
weight edited so far, plus the editor's own state); resuming loads the last chunk's state after
checking that the model's original weights match the ones the run started from. A chunk's
unfinished work (MEMIT's and AlphaEdit's target vectors, ROME's weights after each request) is kept
in out/.partial_K/ until the chunk's folder is in place, so a chunk cut short resumes too."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .cases import (_check_run_config, _run_config, _write_json_atomic, case_metrics_many, case_path,  # noqa: F401
                    chunk_dir, finished_chunks, summarize)
from .datasets import EvalRecord
from ..files import remove_stale_temporaries, tensors_sha256

STATE_FILE = "state.safetensors"
# records measured together: their sequences and generations share forward passes (a sequential
# run's "pre" / "post" files are written per group, so an interruption loses at most one group)
MEASURE_GROUP = 100


# ---------------------------------------------------------------------------------------------
# Chunks and conflicts

def chunk_records(records, num_edits: int) -> list[list[EvalRecord]]:
    if num_edits < 1:
        raise ValueError(f"--num-edits must be at least 1, got {num_edits}")
    return [records[i:i + num_edits] for i in range(0, len(records), num_edits)]


def drop_conflicts(chunk) -> tuple[list[EvalRecord], list[dict]]:
    """(kept, dropped): a record asking for another target of an earlier kept record's
    (subject, prompt) is dropped. Duplicates with the same target are kept."""
    seen, kept, dropped = {}, [], []
    for r in chunk:
        key = (r.subject, r.requested_rewrite["prompt"])
        if key in seen and seen[key].target_new != r.target_new:
            dropped.append({"case_id": r.case_id, "conflicts_with": seen[key].case_id,
                            "subject": r.subject, "prompt": r.requested_rewrite["prompt"],
                            "target_new": r.target_new, "kept_target": seen[key].target_new})
            continue
        seen.setdefault(key, r)
        kept.append(r)
    return kept, dropped


# ---------------------------------------------------------------------------------------------
# Editors

class ChunkEditor:
    """Applies one chunk of requests to the model in place; returns {weight name: its value
    before the chunk}. `state_tensors` / `load_state_tensors`: what, besides the weights, a
    sequential run must save to resume (AlphaEdit: the accumulated keys K_pK_pᵀ per layer; a
    run that is not sequential starts every chunk from none)."""

    def __init__(self, method: str, hparams, backend: Optional[str] = None, sequential: bool = False, **kwargs):
        if hparams is None:
            raise ValueError(f"the {method} editor needs hyperparameters")
        self.method, self.hparams, self.backend, self.kwargs = method, hparams, backend, kwargs
        self.sequential = sequential
        self.cache_c: dict = {}
        self.resumed_seconds = 0.0  # z-step time spent on the last chunk before a resume

    def __call__(self, mt, requests: list[dict], scratch: Optional[Path] = None) -> dict:
        """scratch: a folder where the chunk's finished work is kept (MEMIT and AlphaEdit on the
        fast backend: the target vectors; ROME: the weights after each request), so a chunk cut
        short resumes instead of starting again."""
        self.resumed_seconds = 0.0
        info: dict = {}
        if scratch is not None and self.method in ("memit", "alphaedit") and (self.backend or "fast") == "fast":
            kw = dict(self.kwargs, z_checkpoint=scratch, return_info=info)
        else:
            kw = self.kwargs
        try:
            if self.method == "rome" and scratch is not None:  # the weights saved after each request
                from ..edit.rome_checkpoint import apply_rome_resumable
                return apply_rome_resumable(mt.model, mt.tokenizer, requests, self.hparams, scratch,
                                            backend=self.backend or "fast", return_info=info, **kw)
            return self._edit(mt, requests, kw)
        finally:
            self.resumed_seconds = info.get("seconds", {}).get("z_resumed", info.get("resumed_seconds", 0.0))

    def start(self, mt) -> None:
        """Fix the context templates on the model before any edit (the reference samples them at
        its first edit and keeps them): a run resumed in a new process must not sample them from
        the model its earlier batches edited."""
        if self.kwargs.get("context_templates") is not None:
            return
        seed = self.kwargs.get("seed", 0)
        if self.method == "rome":
            from ..edit.templates import get_context_templates
            templates = get_context_templates(mt.model, mt.tokenizer, self.hparams.context_template_length_params,
                                              seed)
        else:
            from ..edit.memit.templates import get_context_templates
            templates = get_context_templates(mt.model, mt.tokenizer, seed)
        self.kwargs["context_templates"] = templates

    def _edit(self, mt, requests: list[dict], kwargs: dict) -> dict:
        if self.method == "rome":  # one after another, each on the model edited by the ones before
            from ..edit import apply_rome_to_model
            kw = dict(kwargs, **({"backend": self.backend} if self.backend else {}))
            return apply_rome_to_model(mt.model, mt.tokenizer, requests, self.hparams, return_orig_weights=True,
                                       **kw)[1]
        if self.method == "alphaedit":
            from ..edit.alphaedit import apply_alphaedit_to_model
            cache = self.cache_c if self.sequential else {}
            return apply_alphaedit_to_model(mt.model, mt.tokenizer, requests, self.hparams, cache_c=cache,
                                            return_orig_weights=True, backend=self.backend or "fast",
                                            **kwargs)[1]
        from ..edit.backend import apply_edits
        return apply_edits(mt.model, mt.tokenizer, requests, self.hparams, self.method, self.backend or "fast",
                           return_orig_weights=True, **kwargs)[1]

    def state_tensors(self) -> dict:
        return {f"cache_c.{l}": c for l, c in self.cache_c.items()} if self.method == "alphaedit" else {}

    def load_state_tensors(self, tensors: dict) -> None:
        if self.method != "alphaedit":
            if tensors:
                raise ValueError(f"the {self.method} editor keeps no state, but the saved run has {sorted(tensors)}")
            return
        layers = sorted(int(n.split(".", 1)[1]) for n in tensors if n.startswith("cache_c.") and
                        n.split(".", 1)[1].isdigit())
        if layers != sorted(self.hparams.layers) or len(tensors) != len(layers):
            raise ValueError(f"the saved AlphaEdit state holds {sorted(tensors)}, not the accumulated keys of "
                             f"layers {self.hparams.layers}; it belongs to another run")
        self.cache_c = {l: tensors[f"cache_c.{l}"].clone() for l in layers}


def method_hparams(method: str, model_name: str, path=None):
    """The hyperparameters of `method`: a JSON file, or the model's bundled preset."""
    from ..edit.commands import EDIT_METHODS
    if method == "rome":
        from ..edit import ROMEHyperParams as H
    elif method == "memit":
        from ..edit.memit import MEMITHyperParams as H
    elif method == "alphaedit":
        from ..edit.alphaedit import AlphaEditHyperParams as H
    else:
        raise ValueError(f"unknown editing method {method!r}: one of {EDIT_METHODS}")
    return H.from_json(path) if path else H.from_name(model_name)


# ---------------------------------------------------------------------------------------------
# Files


def _write_chunk(out_dir: Path, k: int, cases: list[dict], meta: dict, state: Optional[dict],
                 cases_under: str = "") -> None:
    """The chunk's files in a temporary folder, synced, then renamed into place (atomic); the
    case files in its subfolder `cases_under` if given."""
    final = chunk_dir(out_dir, k)
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if cases and cases_under:
            (tmp / cases_under).mkdir()
        for c in cases:
            _write_json_atomic(case_path(tmp / cases_under, c["case_id"]), c)
        if state is not None:
            from safetensors.torch import save_file
            save_file({n: t.detach().cpu().contiguous() for n, t in state.items()}, str(tmp / STATE_FILE))
            with open(tmp / STATE_FILE, "rb") as f:
                os.fsync(f.fileno())
        _write_json_atomic(tmp / "chunk.json", meta)
        os.rename(tmp, final)
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# The loop

def evaluate_chunks(mt, dataset: str, records: list, hparams, out_dir, *, method: str, num_edits: int,
                    sequential: bool, editor: Optional[Callable] = None, backend: Optional[str] = None,
                    editor_kwargs: Optional[dict] = None, skip_generation: bool = False,
                    generation_interval: int = 1, seed: int = 0, tfidf=None, snippets=None,
                    batch_size: int = 32, progress: bool = True, summary: bool = True,
                    config_extra: Optional[dict] = None, eval_every: Optional[int] = None,
                    stop_on_collapse: Optional[float] = None, pre: bool = True, monitor=None):
    from .. import distributed

    if distributed.current().distributed:
        raise ValueError("the chunked (--num-edits) evaluation runs in one process, not under torchrun")
    if generation_interval < 1:
        raise ValueError(f"--generation-interval must be at least 1, got {generation_interval}")
    if not sequential and (eval_every is not None or stop_on_collapse is not None):
        raise ValueError("--eval-every and --stop-on-collapse belong to a --sequential run")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"--eval-every must be at least 1, got {eval_every}")
    if stop_on_collapse is not None and not (stop_on_collapse >= 0 and math.isfinite(stop_on_collapse)):
        raise ValueError(f"--stop-on-collapse must be a KL threshold >= 0 (nats), got {stop_on_collapse}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".chunk_*.tmp-*"):  # an interrupted chunk's partial files
        shutil.rmtree(stale, ignore_errors=True)
    for folder in (out_dir, out_dir / "pre"):  # an interrupted case file's
        remove_stale_temporaries(folder)
    chunks = chunk_records(records, num_edits)
    editor = editor or ChunkEditor(method, hparams, backend, sequential=sequential, **(editor_kwargs or {}))
    if isinstance(editor, ChunkEditor):
        editor.start(mt)  # on the unedited model: a resumed run loads its edited weights later
    extra = {**(config_extra or {}), "method": method, "num_edits": num_edits, "sequential": bool(sequential),
             "generation_interval": generation_interval, "records": len(records)}
    if sequential:
        extra.update(eval_every=eval_every, pre=bool(pre))
    config = _run_config(mt, dataset, records, hparams, skip_generation, seed, backend, extra)
    _check_run_config(out_dir, config)
    done = finished_chunks(out_dir)
    for k in done:  # a finished chunk's z vectors, if the run stopped before removing them
        shutil.rmtree(_scratch(out_dir, k), ignore_errors=True)
    if any(k >= len(chunks) for k in done):
        raise ValueError(f"{out_dir} holds chunk folders beyond this run's {len(chunks)} chunks "
                         "(another --limit?): use another --out folder")
    kw = dict(seed=seed, tfidf=tfidf, snippets=snippets, batch_size=batch_size, accuracy=dataset == "counterfact")

    def measure(items: list, desc: Optional[str] = None, record=lambda x: x):
        """(group, metrics) for `items` in groups of MEASURE_GROUP records measured together, with
        a progress bar counting them when desc is given; record(item) is the item's record."""
        from tqdm.auto import tqdm
        with tqdm(total=len(items), desc=desc, unit="case", disable=desc is None or not progress or not items) as bar:
            for s in range(0, len(items), MEASURE_GROUP):
                group = items[s:s + MEASURE_GROUP]
                recs = [record(x) for x in group]
                yield group, case_metrics_many(mt, recs, [skip_generation or r.case_id % generation_interval != 0
                                                          for r in recs], **kw)
                bar.update(len(group))

    run = _sequential_run if sequential else _independent_chunks
    stopped = run(mt, dataset, chunks, out_dir, done, editor, measure, method=method, num_edits=num_edits,
                  progress=progress, eval_every=eval_every, stop_on_collapse=stop_on_collapse, pre=pre,
                  monitor=monitor, seed=seed)
    if stopped:  # no final measurement: the run ended at the collapse
        return {"stopped_on_collapse": stopped, "dir": str(out_dir), "monitor": str(out_dir / "monitor.json")}
    return summarize(out_dir, print_table=progress) if summary else None


def _independent_chunks(mt, dataset, chunks, out_dir, done, editor, measure, *, method, num_edits, progress,
                        **_):
    """MultiCounterFact: each chunk on the original model; post, restore, pre."""
    from tqdm.auto import tqdm
    dropped_total = sum(len(m.get("dropped", [])) for m in done.values())
    todo = [k for k in range(len(chunks)) if k not in done]
    for k in tqdm(todo, desc=f"eval {dataset} ({method}, {num_edits} per chunk)", unit="chunk",
                  disable=not progress):
        kept, dropped = _kept(chunks[k], k, progress)
        dropped_total += len(dropped)
        orig, elapsed = _timed(editor, mt, kept, _scratch(out_dir, k))
        try:
            post = _measure_all(measure, kept)
        finally:
            _restore(mt.model, orig)
        pre = _measure_all(measure, kept)
        cases = [{"case_id": r.case_id, "requested_rewrite": r.requested_rewrite, "time": elapsed,
                  "num_edits": len(kept), "chunk": k, "post": po, "pre": pr} for r, po, pr in zip(kept, post, pre)]
        _write_chunk(out_dir, k, cases, {"chunk": k, "case_ids": [r.case_id for r in kept], "num_edits": len(kept),
                                         "edit_seconds": elapsed, "dropped": dropped}, None)
        shutil.rmtree(_scratch(out_dir, k), ignore_errors=True)
    if progress and dropped_total:
        print(f"dropped {dropped_total} conflicting request(s) in all")


def _kept(chunk, k, progress):
    kept, dropped = drop_conflicts(chunk)
    if dropped and progress:
        print(f"chunk {k}: dropped {len(dropped)} conflicting request(s) (same subject and prompt as an "
              f"earlier request of the chunk, another target): case(s) {[d['case_id'] for d in dropped]}")
    return kept, dropped


def _timed(editor, mt, kept, scratch: Path):
    """(the original weights, the edit's seconds, those of a resumed z step included); the
    package's own editor keeps finished target vectors in `scratch` (see ChunkEditor)."""
    start = time.perf_counter()
    if not kept:
        return {}, 0.0
    own = isinstance(editor, ChunkEditor)
    orig = editor(mt, [r.request() for r in kept], scratch) if own else editor(mt, [r.request() for r in kept])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return orig, time.perf_counter() - start + (editor.resumed_seconds if own else 0.0)


def _scratch(out_dir: Path, k: int) -> Path:
    return out_dir / f".partial_{k:05d}"


def _sequential_run(mt, dataset, chunks, out_dir, done, editor, measure, *, method, num_edits, progress,
                    eval_every, stop_on_collapse, pre, monitor, seed):
    """Chunks applied one after another (AlphaEdit's protocol); the collapse monitor after each;
    every record measured once, after the last chunk ("post"; "pre" on the original model, before
    any edit). eval_every=k: also the records edited so far, after every k-th chunk (kept in that
    chunk's folder, `after/`). Resumable: per chunk (edit state) and per group of records
    measured together."""
    from tqdm.auto import tqdm

    from .monitor import CollapseMonitor, write_monitor

    monitor = monitor or CollapseMonitor(mt, seed=seed)          # on the original model
    header = monitor.header()
    kept_all = [drop_conflicts(c)[0] for c in chunks]
    if pre:  # on the original model, before any edit, one file per record (resumable)
        (out_dir / "pre").mkdir(exist_ok=True)
        todo_pre = [r for c in kept_all for r in c if not case_path(out_dir / "pre", r.case_id).is_file()]
        for group, metrics in measure(todo_pre, "pre (unedited model)"):
            for r, m in zip(group, metrics):
                _write_json_atomic(case_path(out_dir / "pre", r.case_id), m)
    originals: dict = {}   # weight values from before the run's first edit
    last = max(done) if done else -1
    if done:
        if sorted(done) != list(range(last + 1)):
            raise ValueError(f"{out_dir}: the finished chunks {sorted(done)} are not 0..{last}; cannot resume")
        originals = _resume(mt, editor, out_dir, last, done[last])
    stopped = next((m["stopped_on_collapse"] for m in done.values() if m.get("stopped_on_collapse")), None)
    batches = [done[k]["monitor"] for k in sorted(done) if "monitor" in done[k]]
    edits = sum(m["num_edits"] for m in done.values())
    try:
        todo = [] if stopped else list(range(last + 1, len(chunks)))
        for k in tqdm(todo, desc=f"eval {dataset} ({method}, {num_edits} per batch, sequential)", unit="batch",
                      disable=not progress):
            kept, dropped = _kept(chunks[k], k, progress)
            orig, elapsed = _timed(editor, mt, kept, _scratch(out_dir, k))
            for name, w in orig.items():
                originals.setdefault(name, w)
            edits += len(kept)
            entry = monitor.measure(mt, k, edits, orig, elapsed)
            meta = {"chunk": k, "case_ids": [r.case_id for r in kept], "num_edits": len(kept),
                    "edit_seconds": elapsed, "dropped": dropped, "monitor": entry,
                    "original_weights_sha256": tensors_sha256(originals)}
            if stop_on_collapse is not None and entry["kl"] > stop_on_collapse:
                stopped = meta["stopped_on_collapse"] = {"batch": k, "edits": edits, "kl": entry["kl"],
                                                         "threshold": stop_on_collapse}
            cases = []
            if eval_every and (k + 1) % eval_every == 0 and k < len(chunks) - 1 and not stopped:
                so_far = [r for c in kept_all[:k + 1] for r in c]
                cases = [{"case_id": r.case_id, "after_batch": k, "edits": edits, "post": p}
                         for r, p in zip(so_far, _measure_all(measure, so_far))]
            state = {f"weights.{n}": mt.model.get_parameter(n) for n in originals}
            state.update({f"editor.{n}": t for n, t in editor.state_tensors().items()})
            _write_chunk(out_dir, k, cases, meta, state, cases_under="after")
            shutil.rmtree(_scratch(out_dir, k), ignore_errors=True)
            if k > 0:  # only the latest state is needed to resume
                (chunk_dir(out_dir, k - 1) / STATE_FILE).unlink(missing_ok=True)
            batches.append(entry)
            write_monitor(out_dir, header, batches, stopped)
            if progress:
                print(f"batch {k}: {edits} edits, KL {entry['kl']:.4g}, n-gram entropy {entry['ngram_entropy']:.3f}, "
                      f"edit {elapsed:.1f} s")
            if stopped:
                if progress:
                    print(f"stopped on collapse after batch {k} ({edits} edits): KL {entry['kl']:.4g} > "
                          f"{stop_on_collapse:g}; the original weights are restored")
                break
        if not stopped:  # every record, once, on the final model
            final = [(k, r) for k, c in enumerate(kept_all) for r in c]
            todo_final = [(k, r) for k, r in final if _measured_edits(case_path(out_dir, r.case_id)) != edits]
            seconds = {k: m["edit_seconds"] for k, m in finished_chunks(out_dir).items()}
            for group, metrics in measure(todo_final, "post (after the last batch)", record=lambda x: x[1]):
                for (k, r), m in zip(group, metrics):
                    p = json.loads(case_path(out_dir / "pre", r.case_id).read_text(encoding="utf-8")) if pre else None
                    _write_json_atomic(case_path(out_dir, r.case_id),
                                       {"case_id": r.case_id, "requested_rewrite": r.requested_rewrite,
                                        "time": seconds[k], "num_edits": len(kept_all[k]), "chunk": k,
                                        "edits": edits, "post": m, "pre": p})
        write_monitor(out_dir, header, batches, stopped)
    finally:
        _restore(mt.model, originals)
    return stopped


def _measure_all(measure, records: list) -> list:
    """The metrics of every record (`measure`: evaluate_chunks's grouped measurement)."""
    return [m for _, metrics in measure(records) for m in metrics]


def _measured_edits(path: Path):
    """How many edits the model had when the final case file was measured (None: no file). A run
    extended by more batches (a larger --limit) measures its records again."""
    return json.loads(path.read_text(encoding="utf-8")).get("edits") if path.is_file() else None


def _restore(model, orig: dict) -> None:
    with torch.no_grad():
        for name, w in orig.items():
            model.get_parameter(name).copy_(w)


def _resume(mt, editor, out_dir: Path, last: int, meta: dict) -> dict:
    """Load the edit state saved after chunk `last`; returns the original weights (clones of the
    model's values before loading, checked against the run's fingerprint)."""
    from safetensors.torch import load_file
    path = chunk_dir(out_dir, last) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: the sequential run cannot resume from chunk {last}; "
                         "use another --out folder to start afresh")
    saved = load_file(str(path))
    names = [n[len("weights."):] for n in saved if n.startswith("weights.")]
    try:
        originals = {n: mt.model.get_parameter(n).detach().clone() for n in names}
    except AttributeError as exc:
        raise ValueError(f"{path} does not match this model: {exc}") from None
    for n in names:
        if saved[f"weights.{n}"].shape != originals[n].shape:
            raise ValueError(f"{path} does not match this model: {n} is {tuple(saved['weights.' + n].shape)} "
                             f"there, {tuple(originals[n].shape)} here")
    if tensors_sha256(originals) != meta.get("original_weights_sha256"):
        raise ValueError(f"{path} was saved from a model whose original weights differ from this one's; "
                         "use another --out folder to start afresh")
    editor.load_state_tensors({n[len("editor."):]: t for n, t in saved.items() if n.startswith("editor.")})
    with torch.no_grad():
        for n in names:
            mt.model.get_parameter(n).copy_(saved[f"weights.{n}"])
    return originals
