"""One evaluation case and the folder of a run, shared by the single-edit loop (runner.py) and the
mass-editing protocol (chunked.py): the metrics of a record on the model as it is
(`case_metrics`), the run's files (case files and chunk folders written atomically, run.json, which
refuses to mix runs) and its summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..files import file_id, inside, write_json_atomic as _write_json_atomic
from . import generation as G
from . import metrics as M
from .datasets import EvalRecord


GEN_SOURCE_COMPACT = "rewrite prompt + paraphrase, 1 sample each (compact records)"
GEN_SOURCE_FULL = "generation_prompts, 1 sample each"


def generation_prompts(record: EvalRecord) -> list[str]:
    if record.generation_prompts:
        return list(record.generation_prompts)
    return [record.rewrite_prompt] + list(record.paraphrase_prompts)


def case_metrics(mt, record: EvalRecord, skip_generation: bool = False, seed: int = 0,
                 tfidf: Optional[G.TfIdf] = None, snippets: Optional[dict] = None,
                 batch_size: int = M.DEFAULT_BATCH, accuracy: bool = False) -> dict:
    """CounterFact: NLLs of new/true per prompt kind (+ the teacher-forced accuracies with
    accuracy=True; + generations, GE, and RS / essence score when TF-IDF and snippets are given);
    zsRE: teacher-forced token accuracies."""
    return case_metrics_many(mt, [record], [skip_generation], seed, tfidf, snippets, batch_size, accuracy)[0]


def case_metrics_many(mt, records: Sequence[EvalRecord], skip_generation: Sequence[bool], seed: int = 0,
                      tfidf: Optional[G.TfIdf] = None, snippets: Optional[dict] = None,
                      batch_size: int = M.DEFAULT_BATCH, accuracy: bool = False) -> list[dict]:
    """`case_metrics` of several records (skip_generation: one flag per record), with their
    sequences and their generations batched together; each record's generations keep their own
    seed (seed + case_id), so the numbers are the one-record call's, up to rounding."""
    model, tok = mt.model, mt.tokenizer
    if len(skip_generation) != len(records):
        raise ValueError(f"{len(records)} records but {len(skip_generation)} skip_generation flags")
    zsre = [r.dataset == "zsre" for r in records]
    cf = [r for r, z in zip(records, zsre) if not z]
    probs = iter(M.counterfact_probs_many(model, tok, cf, batch_size, accuracy=accuracy))
    zs = iter(M.zsre_correct_many(model, tok, [r for r, z in zip(records, zsre) if z], batch_size))
    outs = [next(zs) if z else next(probs) for z in zsre]
    gen = [i for i, r in enumerate(records) if not zsre[i] and not skip_generation[i]]
    texts = G.generate_many(model, tok, [generation_prompts(records[i]) for i in gen],
                            [seed + records[i].case_id for i in gen], max_out_len=100, top_k=5)
    for i, t in zip(gen, texts):
        _generation_scores(model, tok, records[i], outs[i], t, tfidf, snippets)
    return outs


def _generation_scores(model, tok, record, out: dict, texts: list[str], tfidf, snippets) -> None:
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


# ---------------------------------------------------------------------------------------------
# The files of a run

def case_path(out_dir, case_id: int) -> Path:
    """out_dir/case_{id}.json; the id must be a non-negative integer (it becomes a file name)."""
    return inside(out_dir, Path(out_dir) / f"case_{file_id(case_id, 'case_id', names=False)}.json")


def _check_run_config(out_dir: Path, config: dict, write: bool = True) -> None:
    """Refuse to mix cases of different runs (another model or dataset) in one folder."""
    path = out_dir / "run.json"
    if not write and not path.is_file():
        raise RuntimeError(f"{path} is missing")
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("dataset", "model", "skip_generation", "seed", "backend", "hparams", "key_mode",
                    "sequential", "method", "num_edits", "generation_interval", "data_sha256", "eval_every",
                    "pre"):
            if key == "data_sha256" and (key not in old or config.get(key) is None):
                continue  # a run.json of an earlier version, or records passed in without their file
            if key in old and old[key] != config.get(key):
                raise ValueError(f"{out_dir} holds a run with {key}={old[key]!r}, not {config.get(key)!r}; "
                                 "use another --out folder (or delete this one) to start afresh")
    if write:
        _write_json_atomic(path, config)


def _run_config(mt, dataset, records, hparams, skip_generation, seed, backend, extra: dict) -> dict:
    """What run.json records of a run: what must agree for its cases to belong together."""
    return {**extra, "dataset": dataset, "model": getattr(mt, "name", type(mt.model).__name__),
            "skip_generation": bool(skip_generation), "seed": seed, "backend": backend,
            "hparams": hparams.to_dict() if hasattr(hparams, "to_dict") else None,
            "generation": None if skip_generation or dataset == "zsre" else
            {"max_out_len": 100, "top_k": 5, "seed": "seed + case_id",
             "prompts": GEN_SOURCE_FULL if any(r.generation_prompts for r in records) else GEN_SOURCE_COMPACT}}


def chunk_dir(out_dir, k: int) -> Path:
    return Path(out_dir) / f"chunk_{k:05d}"


def finished_chunks(out_dir) -> dict[int, dict]:
    """{k: chunk.json} of the chunks whose folder is in place."""
    out = {}
    for d in Path(out_dir).glob("chunk_*"):
        meta = d / "chunk.json"
        if d.is_dir() and meta.is_file() and d.name[6:].isdigit():
            out[int(d.name[6:])] = json.loads(meta.read_text(encoding="utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# Summary

def _load_cases(out_dir: Path) -> list[dict]:
    cases = []
    for p in [*out_dir.glob("case_*.json"), *out_dir.glob("chunk_*/case_*.json")]:
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
    zsre = "rewrite_prompts_probs" not in cases[0]["post"]
    per_case = M.zsre_case_scores if zsre else M.counterfact_case_scores
    keys = M.ZSRE_KEYS if zsre else M.CF_KEYS
    result = {"dataset": "zsre" if zsre else "counterfact", "n": len(cases), "dir": str(out_dir)}
    scored = {}  # phase -> [(case, its scores)]
    for phase in ("pre", "post"):  # a sequential run may skip "pre"
        scored[phase] = [(c, per_case(c[phase])) for c in cases if c.get(phase) is not None]
        result[phase] = M.aggregate([x for _, x in scored[phase]], keys) if scored[phase] else {}
    result["time"] = M.mean_std_ci([c["time"] for c in cases], scale=1.0)
    run = out_dir / "run.json"
    if run.is_file():
        cfg = json.loads(run.read_text(encoding="utf-8"))
        result["model"] = cfg.get("model")
        if "num_edits" in cfg:  # a chunked (mass-editing) run
            if cfg.get("sequential"):  # what is left of each batch's edits after the last batch
                result["post_by_batch"] = _post_by_batch(scored["post"], keys)
            chunks = finished_chunks(out_dir).values()
            edits, secs = sum(c["num_edits"] for c in chunks), sum(c["edit_seconds"] for c in chunks)
            result["chunks"] = {"method": cfg.get("method"), "num_edits": cfg["num_edits"],
                                "sequential": cfg.get("sequential", False), "chunks": len(chunks), "edits": edits,
                                "dropped_conflicts": sum(len(c.get("dropped", [])) for c in chunks),
                                "edit_seconds": secs, "seconds_per_edit": secs / edits if edits else None}
        if cfg.get("generation"):
            result["notes"] = {"GE": "n-gram entropy ×100 of generations from " + cfg["generation"]["prompts"]}
    _write_json_atomic(out_dir / "summary.json", result)
    if print_table:
        print(format_summary(result))
    return result


def _post_by_batch(scored: list[tuple[dict, dict]], keys) -> list[dict]:
    """The final ("post") metrics of a sequential run's records, given as (case, its scores),
    grouped by the batch that edited them: [{"batch", "n", metric: {mean, ...}}], oldest batch
    first. A late batch scoring higher than an early one means the later edits overwrote the
    earlier ones."""
    groups: dict[int, list] = {}
    for c, x in scored:
        if c.get("chunk") is not None:
            groups.setdefault(c["chunk"], []).append(x)
    return [{"batch": k, "n": len(v), **M.aggregate(v, keys)} for k, v in sorted(groups.items())]


def run_progress(out_dir) -> Optional[dict]:
    """Where an unfinished mass-editing (--num-edits) run stands, from its files: the chunks done
    of all (when run.json knows the number of records), edits and edit seconds so far, records with
    "pre" and final case files, and the collapse monitor's last batch. None if `out_dir` holds no
    such run."""
    out_dir = Path(out_dir)
    run = out_dir / "run.json"
    cfg = json.loads(run.read_text(encoding="utf-8")) if run.is_file() else {}
    if "num_edits" not in cfg:
        return None
    chunks = finished_chunks(out_dir).values()
    records = cfg.get("records")
    edits, secs = sum(c["num_edits"] for c in chunks), sum(c["edit_seconds"] for c in chunks)
    out = {"dir": str(out_dir), "model": cfg.get("model"), "method": cfg.get("method"),
           "num_edits": cfg["num_edits"], "sequential": bool(cfg.get("sequential")), "records": records,
           "chunks_done": len(chunks), "chunks": -(-records // cfg["num_edits"]) if records else None,
           "edits": edits, "edit_seconds": secs,
           "pre_measured": len(list((out_dir / "pre").glob("case_*.json"))),
           "final_measured": len(list(out_dir.glob("case_*.json"))) + len(list(out_dir.glob("chunk_*/case_*.json")))}
    batches = [c["monitor"] for c in sorted(chunks, key=lambda c: c["chunk"]) if "monitor" in c]
    if batches:
        out["last_batch"] = {k: batches[-1][k] for k in ("batch", "edits", "kl", "ngram_entropy")}
    return out


def format_progress(p: dict) -> str:
    of = f" of {p['chunks']}" if p["chunks"] else ""
    kind = "sequential batches" if p["sequential"] else "chunks"
    lines = [f"{p['method']} run in progress in {p['dir']}" + (f", model {p['model']}" if p.get("model") else ""),
             f"{kind} of up to {p['num_edits']} edits done: {p['chunks_done']}{of}; {p['edits']} edits, edit time "
             f"{p['edit_seconds']:.0f} s" + (f" ({p['edit_seconds'] / p['edits']:.2f} s/edit)" if p["edits"] else "")]
    if p["sequential"]:
        lines.append(f"measured: {p['pre_measured']} records before any edit, {p['final_measured']} after the "
                     "last batch")
    last = p.get("last_batch")
    if last:
        lines.append(f"collapse monitor after batch {last['batch']} ({last['edits']} edits): KL {last['kl']:.4g}, "
                     f"n-gram entropy {last['ngram_entropy']:.3f}")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    """The summary as a table: mean (95 % CI) per metric, rows pre / post."""
    cols = (["Efficacy", "Paraphrase", "Specificity"] if s["dataset"] == "zsre" else
            ["S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "rewrite_acc", "paraphrase_acc",
             "neighborhood_acc"])
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
    c = s.get("chunks")
    if c:
        lines.append(f"{c['method']}: {c['edits']} edits in {c['chunks']} chunk(s) of up to {c['num_edits']}"
                     f"{' (sequential)' if c['sequential'] else ''}, edit time {c['edit_seconds']:.1f} s "
                     f"({c['seconds_per_edit'] or 0:.2f} s/edit); {c['dropped_conflicts']} conflicting "
                     "request(s) dropped; values ×100, 95 % CI in parentheses")
    else:
        lines.append(f"edit time {s['time']['mean']:.2f} s/case; values ×100, 95 % CI in parentheses")
    for k, v in (s.get("notes") or {}).items():
        lines.append(f"{k}: {v}")
    by_batch = s.get("post_by_batch")
    if by_batch:
        cols = [c for c in ("S", "ES", "PS", "NS", "Efficacy", "Paraphrase", "Specificity") if c in by_batch[0]]
        lines.append("post by the batch that edited the record (×100): batch, records, " + ", ".join(cols))
        lines += [f"  {b['batch']:>4}  {b['n']:>5}  " + "  ".join(f"{c} {cell(b[c])}" for c in cols) for b in by_batch]
    return "\n".join(lines)
