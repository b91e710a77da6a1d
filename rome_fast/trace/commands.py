"""`rome-fast trace`: causal tracing of one fact (--prompt/--subject) or a facts file (--facts)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import distributed
from ..arguments import positive_int
from ..files import atomic_write, read_text
from ..models.loading import load_model_spec
from .aggregate import aggregate_dir
from .api import BACKENDS, DEFAULT_BACKEND, calculate_hidden_flow, check_fact_text
from .kinds import KINDS, get_kind, kind_names
from .noise import parse_noise_rule, resolve_noise
from .plots import plot_trace_heatmap
from .results import ResultFileError, TraceResult
from .runner import (_check_run_settings, bad_records_error, check_facts, read_facts_file, read_run_settings,
                     trace_facts)
from .summary import summarize_trace


def print_trace_summary(summary: dict) -> None:
    skipped = summary.get("skipped_records", ())
    summary = {k: v for k, v in summary.items() if k != "skipped_records"}
    for kind, s in summary.items():
        print(f"{kind:>6}: {s['n_correct']}/{s['n_facts']} correct, ATE {s['ate']:.4f}, "
              f"best AIE last subject token {s['best_aie_last_subject_token']:.4f} "
              f"(layer {s['best_aie_last_subject_token_layer']}), last token "
              f"{s['best_aie_last_token']:.4f} (layer {s['best_aie_last_token_layer']})")
    if not summary:
        print("no correctly predicted facts: nothing to average")
    if skipped:
        print(f"skipped {len(skipped)} bad fact record{'s' if len(skipped) > 1 else ''} "
              "(listed in summary.json under skipped_records)")


def _read_subjects(path) -> list[str]:
    """Subjects from a JSON list (of strings or of records with 'subject') or a text file, one a line."""
    text = read_text(path, "noise subjects file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    subjects = [d.get("subject") if isinstance(d, dict) else d for d in data] if isinstance(data, list) else None
    if not subjects or not all(isinstance(s, str) and s.strip() for s in subjects):
        raise ValueError(f"{path}: expected a non-empty list of subjects (strings) or of fact records with "
                         "'subject'")
    return subjects


def _read_corpus(path) -> list[str] | None:
    if path is None:
        return None
    texts = [line for line in read_text(path, "noise corpus").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"noise corpus {path} holds no text: give a file of texts, one a line")
    return texts


def _cmd_trace(args) -> int:
    # everything that needs no model is checked before loading one (10-30 s)
    if (args.facts is None) == (args.prompt is None):
        raise ValueError("give either --facts FILE or --prompt TEXT with --subject WORDS")
    if args.whole_answer and args.facts is None:
        raise ValueError("--whole-answer scores the facts' attributes: use it with --facts (--answer TEXT with --prompt)")
    if args.answer is not None and args.facts is not None:
        raise ValueError("--answer is for one --prompt; with --facts use --whole-answer (each fact's attribute)")
    corpus = _read_corpus(args.noise_corpus)
    parse_noise_rule(args.noise, has_texts=corpus is not None)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.facts is not None:
        records = read_facts_file(args.facts)
        facts, bad = check_facts(records)
        if bad and not args.skip_bad:
            raise bad_records_error(args.facts, bad)
        if not facts:
            raise ValueError(f"{args.facts}: none of its {len(records)} records can be traced")
        info = distributed.init()  # a no-op unless torchrun started several processes
        try:
            # under torchrun each rank on its own GPU; alone, the usual default
            mt = load_model_spec(args.model, device=info.device if info.distributed else None)
            summary = trace_facts(mt, records, args.out, kinds=args.kind, noise=args.noise,
                                  samples=args.samples, window=args.window, limit=args.limit,
                                  backend=args.backend, progress=not args.no_progress and info.is_main,
                                  replace=args.replace, noise_texts=corpus, case_plots=args.case_plots,
                                  skip_bad=args.skip_bad, source=str(args.facts),
                                  whole_answer=args.whole_answer)
        finally:
            distributed.finalize()
        if not info.is_main:
            return 0
        print_trace_summary(summary)
        print(f"results in {args.out}/ (cases/, summary.json, aie_heatmap.*, aie_lines.*)")
        return 0

    if not args.subject:
        raise ValueError("--prompt needs --subject (the words of the prompt to corrupt)")
    check_fact_text(args.prompt, args.subject)
    if distributed.env_info().distributed:  # every rank would trace the same fact into the same files
        raise ValueError("--prompt traces one fact: run it without torchrun (use --facts to shard)")
    subjects = _read_subjects(args.noise_subjects) if args.noise_subjects else [args.subject]
    mt = load_model_spec(args.model)
    noise, uniform = resolve_noise(args.noise, mt, subjects, texts=corpus)
    out = Path(args.out)
    for kind in kind_names(args.kind):
        t0 = time.time()
        res = calculate_hidden_flow(mt, args.prompt, args.subject, samples=args.samples, noise=noise,
                                    uniform_noise=uniform, replace=args.replace, window=args.window,
                                    kind=kind, backend=args.backend, answer=args.answer)
        r = TraceResult.from_dict(res)
        stem = out / f"trace{get_kind(kind).suffix}"
        r.save(stem.with_suffix(".npz"))
        plot_trace_heatmap(r, savepdf=stem.with_suffix(".pdf"), modelname=mt.name)
        print(f"{kind}: answer {r.answer!r}, clean p = {r.high_score:.4f}, corrupted p = {r.low_score:.4f} "
              f"({time.time() - t0:.1f} s)")
        for line in summarize_trace(r, kind, mt.num_layers):
            print("  " + line)
    print(f"results in {out}/ (trace*.npz, trace*.png, trace*.pdf)")
    return 0


def _cmd_aggregate(args) -> int:
    """Re-aggregate a trace folder, after merging in the case files of other runs if asked."""
    import shutil

    out = Path(args.dir)
    for src in map(Path, args.merge or ()):
        run = src / "run.json"
        if not run.is_file() or not (src / "cases").is_dir():
            raise FileNotFoundError(f"{src} is not a trace folder (no run.json and cases/)")
        settings = read_run_settings(run)
        (out / "cases").mkdir(parents=True, exist_ok=True)
        # refused when the settings differ: averages over mixed settings mean nothing
        _check_run_settings(out / "run.json", settings)
        copied = 0
        for f in sorted((src / "cases").glob("knowledge_*.npz")):
            target = out / "cases" / f.name
            if target.exists():
                continue  # already there: the same fact under the same settings
            try:
                TraceResult.load(f)  # read without pickle, as every result file
            except ResultFileError as exc:
                print(f"rome-fast: {exc.path}: {exc.reason}; not copied", file=sys.stderr)
                continue
            with open(f, "rb") as source:  # atomic: a reader never sees half a file
                atomic_write(target, lambda dst: shutil.copyfileobj(source, dst))
            copied += 1
        print(f"{src}: {copied} case files copied")
    if not (out / "cases").is_dir():
        raise FileNotFoundError(f"{out}/cases not found: not a trace folder")
    model = read_run_settings(out / "run.json").get("model") if (out / "run.json").is_file() else None
    summary = aggregate_dir(out, kind_names(args.kind), figures=not args.no_figures, modelname=model or None)
    print_trace_summary(summary)
    print(f"summary in {out}/summary.json")
    return 0


def add_parsers(sub) -> None:
    """Register `trace` and `aggregate` on the `rome-fast` subparsers."""
    p = sub.add_parser("trace", help="causal tracing of one fact or of a known-facts file",
                       description="Causal tracing (Meng et al. 2022): corrupt the subject's embeddings "
                                   "with noise, restore one state at a time, measure p(answer).")
    src = p.add_argument_group("what to trace")
    src.add_argument("--prompt", help="the prompt (text up to the answer)")
    src.add_argument("--subject", help="the words of the prompt to corrupt")
    src.add_argument("--facts", help="known-facts JSON (known_1000 format) to trace instead")
    src.add_argument("--limit", type=positive_int, help="trace only the first N facts")
    src.add_argument("--skip-bad", action="store_true",
                     help="with --facts: leave out bad records (listed in summary.json) instead of refusing the file")
    p.add_argument("--kind", default="all", choices=["all", *KINDS],
                   help="what to restore: " + "; ".join(f"{k.name}: {k.description}" for k in KINDS.values())
                        + " (default all)")
    p.add_argument("--noise", default="s3",
                   help="noise rule: sK (K·σ of the subjects' embeddings, default s3), a number (std), "
                        "uX (uniform ±X), tD (Student-t), m (fitted Gaussian, needs --noise-corpus)")
    p.add_argument("--noise-subjects", help="for one fact: file of subjects σ is measured on "
                                            "(default: the fact's own subject)")
    p.add_argument("--noise-corpus", help="text file (one text a line) for the 'm' rule")
    p.add_argument("--samples", type=positive_int, default=10, help="corrupted runs per pass (default 10)")
    p.add_argument("--window", type=positive_int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--whole-answer", action="store_true",
                   help="with --facts: score each fact's whole attribute (teacher-forced, the product of its "
                        "tokens' probabilities) instead of the clean top-1 token; every fact is traced")
    p.add_argument("--answer", help="with --prompt: score this whole answer instead of the clean top-1 token")
    p.add_argument("--replace", action="store_true", help="replace the subject embeddings with noise instead of adding it")
    p.add_argument("--model", default="smollm2-135m",
                   help="model: smollm2-135m (embedded default), a hub id, a local path or a .gguf")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()) + f" (default {DEFAULT_BACKEND})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--case-plots", action="store_true", help="with --facts: a heat map per fact (ids <= 200)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (on a busy machine 1 can be much faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_trace)

    a = sub.add_parser("aggregate", help="average the per-fact results of a trace folder (again)",
                       description="Recompute summary.json and the AIE figures of a trace folder from "
                                   "every case file in DIR/cases, e.g. after merging separate runs.")
    a.add_argument("dir", help="trace output folder (with cases/)")
    a.add_argument("--merge", nargs="+", metavar="SRC",
                   help="first copy the case files DIR lacks from these trace folders (their run.json "
                        "settings must equal DIR's; DIR takes the first one's when it has none)")
    a.add_argument("--kind", default="all", choices=["all", *KINDS])
    a.add_argument("--no-figures", action="store_true", help="summary.json only")
    a.set_defaults(func=_cmd_aggregate)
