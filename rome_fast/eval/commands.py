"""`rome-fast eval`: run the CounterFact / zsRE evaluation of ROME edits from the shell."""
from __future__ import annotations

from pathlib import Path

# The shared data folder beside the repository (development checkouts and CI have it).
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_FILES = {"counterfact": "counterfact-edit.json", "zsre": "zsre_mend_train-1k.json"}
# Offline stand-in for Wikipedia for the second-moment statistics, when no corpus is named.
SHARED_CORPUS = SHARED_DATA / "wikitext-2-raw-test.txt"


def default_data_file(dataset: str) -> Path | None:
    path = SHARED_DATA / DEFAULT_FILES[dataset]
    return path if path.is_file() else None


def _cmd_eval(args) -> int:
    from .datasets import load_dataset
    from .generation import TfIdf, load_attribute_snippets
    from .runner import evaluate

    data = Path(args.data) if args.data else default_data_file(args.dataset)
    if data is None:
        raise ValueError(f"no default {args.dataset} file here ({SHARED_DATA / DEFAULT_FILES[args.dataset]} "
                         "is absent); pass --data FILE (official files: rome_fast.eval.DATA_URLS)")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    records = load_dataset(args.dataset, data, args.limit)
    tfidf = snippets = None
    if args.tfidf_dir:
        d = Path(args.tfidf_dir)
        tfidf = TfIdf.from_files(d / "idf.npy", d / "tfidf_vocab.json")
        snippets = load_attribute_snippets(d / "attribute_snippets.json")

    from .chunked import method_hparams
    if not args.hparams and args.model.startswith("tiny:"):
        raise ValueError("a tiny model needs --hparams FILE (there is no preset for it)")
    if args.method != "rome" and args.key_mode != "reference":
        raise ValueError(f"--key-mode is a ROME option, not one of {args.method}")
    if args.num_edits is not None and args.num_edits < 1:
        raise ValueError("--num-edits must be at least 1")
    hparams = method_hparams(args.method, args.model, args.hparams)
    from ..models.loading import cache_root
    stats_dir = args.stats_dir or str(cache_root() / "stats")
    editor_kwargs = {"stats_dir": stats_dir}
    corpus = args.corpus or (str(SHARED_CORPUS) if SHARED_CORPUS.is_file() else None)
    if corpus:
        editor_kwargs["corpus"] = corpus
    if args.key_mode != "reference":
        editor_kwargs["key_mode"] = args.key_mode
    from .. import distributed
    from ..trace.commands import load_model_spec
    info = distributed.init()  # a no-op unless torchrun started several processes
    try:
        # under torchrun each rank on its own GPU; alone, the usual default
        mt = load_model_spec(args.model, device=info.device if info.distributed else None)
        if info.is_main:
            print(f"{args.method.upper()} statistics: {stats_dir} (corpus: {corpus or hparams.mom2_dataset})")
            print(f"evaluating {len(records)} {args.dataset} cases from {data} on {mt!r} -> {args.out}"
                  + (f" ({info.world} processes)" if info.distributed else ""))
        evaluate(mt, args.dataset, records, hparams, args.out, skip_generation=args.skip_generation,
                 progress=not args.quiet and info.is_main, seed=args.seed, tfidf=tfidf,
                 snippets=snippets, backend=args.backend, editor_kwargs=editor_kwargs,
                 sequential=args.sequential, method=args.method, num_edits=args.num_edits,
                 generation_interval=args.generation_interval)
    finally:
        distributed.finalize()
    return 0


def _cmd_summarize(args) -> int:
    from .runner import format_summary, summarize
    for d in args.dirs:
        print(format_summary(summarize(d, print_table=False)))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate ROME edits on CounterFact or zsRE",
                       description="Edit, measure post-edit metrics, restore, measure pre-edit "
                                   "metrics, per record; one JSON file per case in --out "
                                   "(rerun the same command to resume), then a summary table.")
    p.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    p.add_argument("--data", help="data file (CounterFact full or compact JSON, zsRE JSON); default: "
                                  "the shared data folder beside the repository when present")
    p.add_argument("--limit", type=int, help="first N records")
    p.add_argument("--out", required=True, help="output folder for case_*.json and summary.json")
    p.add_argument("--model", default="smollm2-135m",
                   help="model name or path (default: the embedded model); tiny:<family> for tests")
    p.add_argument("--method", choices=["rome", "memit"], default="rome", help="editing method (default rome)")
    p.add_argument("--num-edits", type=int, default=None,
                   help="edit the records in consecutive chunks of N together (MultiCounterFact protocol: each "
                        "chunk applied to the original model, measured, restored; resumable per chunk; "
                        "conflicting requests within a chunk are dropped); default: one record at a time "
                        "(the single-edit protocol; MEMIT: chunks of 1)")
    p.add_argument("--generation-interval", type=int, default=1,
                   help="with --num-edits: generation metrics only for case_id %% K == 0 (default every case)")
    p.add_argument("--hparams", help="hyperparameters JSON of --method (default: the model's bundled preset)")
    p.add_argument("--skip-generation", action="store_true", help="skip the generation metrics (GE, RS)")
    p.add_argument("--backend", choices=["reference", "fast"], help="implementation of --method (default: fast)")
    p.add_argument("--key-mode", default="reference", choices=["reference", "r-rome"],
                   help="r-rome: the template-mean key k̄ also for the denominator and residual")
    p.add_argument("--sequential", action="store_true",
                   help="accumulate the edits (no restore between cases or chunks); pre/post around each "
                        "one's own edit; one process; with --num-edits resumable per chunk, otherwise not "
                        "(needs an empty --out)")
    p.add_argument("--stats-dir", help="folder of second-moment statistics for ROME "
                                       "(default: $ROME_FAST_CACHE/stats)")
    p.add_argument("--corpus", help="text file for the statistics when they are not cached (default: "
                                    "the shared WikiText-2 file when present, else hparams.mom2_dataset)")
    p.add_argument("--tfidf-dir", help="folder with idf.npy, tfidf_vocab.json and "
                                       "attribute_snippets.json: enables RS (full CounterFact records)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (per case: seed + case_id)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_cmd_eval)

    s = sub.add_parser("eval-summary", help="print the summary of evaluation folders")
    s.add_argument("dirs", nargs="+")
    s.set_defaults(func=_cmd_summarize)
