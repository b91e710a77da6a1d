"""`rome-fast eval`: run the CounterFact / zsRE evaluation of ROME edits from the shell."""
from __future__ import annotations

from pathlib import Path

from ..arguments import positive_int

# The official file of each dataset, downloaded once into $ROME_FAST_CACHE/data (rome_fast.data).
DEFAULT_FILES = {"counterfact": "counterfact.json", "zsre": "zsre_mend_eval.json"}


def data_file(dataset: str, data: str | None) -> Path:
    """--data as a path; with no --data the dataset's official file, and a bare official file
    name (rome_fast.data.DATA_URLS, e.g. multi_counterfact.json) that is not a local file is
    fetched too (downloaded once, then read from the cache)."""
    from ..data import DATA_URLS, fetch
    if data is None:
        return fetch(DEFAULT_FILES[dataset])
    path = Path(data)
    if not path.exists() and str(data) in DATA_URLS:
        return fetch(str(data))
    return path


def _cmd_eval(args) -> int:
    from .datasets import load_dataset
    from .generation import TfIdf, load_attribute_snippets
    from ..files import file_sha256
    from .runner import evaluate

    data = data_file(args.dataset, args.data)
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
    from ..edit.commands import statistics_corpus
    from ..models.loading import cache_root
    stats_dir = args.stats_dir or str(cache_root() / "stats")
    editor_kwargs = {"stats_dir": stats_dir}
    if args.key_mode != "reference":
        editor_kwargs["key_mode"] = args.key_mode
    from .. import distributed
    from ..models import load_model_spec
    info = distributed.init()  # a no-op unless torchrun started several processes
    try:
        # under torchrun each rank on its own GPU; alone, the usual default
        mt = load_model_spec(args.model, device=info.device if info.distributed else None)
        corpus = statistics_corpus(args.corpus, args.model, mt.model, hparams, stats_dir)
        if corpus:
            editor_kwargs["corpus"] = corpus
        if info.is_main:
            print(f"{args.method.upper()} statistics: {stats_dir} (corpus: {corpus or hparams.mom2_dataset})")
            print(f"evaluating {len(records)} {args.dataset} cases from {data} on {mt!r} -> {args.out}"
                  + (f" ({info.world} processes)" if info.distributed else ""))
        evaluate(mt, args.dataset, records, hparams, args.out, skip_generation=args.skip_generation,
                 progress=not args.quiet and info.is_main, seed=args.seed, tfidf=tfidf,
                 snippets=snippets, backend=args.backend, editor_kwargs=editor_kwargs,
                 sequential=args.sequential, method=args.method, num_edits=args.num_edits,
                 generation_interval=args.generation_interval, data_sha256=file_sha256(data),
                 eval_every=args.eval_every, stop_on_collapse=args.stop_on_collapse, pre=not args.skip_pre)
    finally:
        distributed.finalize()
    return 0


def _cmd_summarize(args) -> int:
    from .cases import format_progress, format_summary, run_progress, summarize
    for d in args.dirs:
        try:
            print(format_summary(summarize(d, print_table=False)))
        except FileNotFoundError:  # no case files yet: a mass-editing run still editing says where it is
            progress = run_progress(d)
            if progress is None:
                raise
            print(format_progress(progress))
    return 0


def add_parsers(sub) -> None:
    from ..edit.commands import EDIT_METHODS, edit_backend_names

    p = sub.add_parser("eval", help="evaluate ROME edits on CounterFact or zsRE",
                       description="Edit, measure post-edit metrics, restore, measure pre-edit "
                                   "metrics, per record; one JSON file per case in --out "
                                   "(rerun the same command to resume), then a summary table.")
    p.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    p.add_argument("--data", help="data file (CounterFact full or compact JSON, zsRE JSON), or the name of "
                                  "an official file (e.g. multi_counterfact.json) to download once; default: "
                                  "the official counterfact.json / zsre_mend_eval.json, downloaded once "
                                  "into $ROME_FAST_CACHE/data")
    p.add_argument("--limit", type=positive_int, help="first N records")
    p.add_argument("--out", required=True, help="output folder for case_*.json and summary.json")
    p.add_argument("--model", default="smollm2-135m",
                   help="model name or path (default: the embedded model); tiny:<family> for tests")
    p.add_argument("--method", choices=EDIT_METHODS, default="rome", help="editing method (default rome)")
    p.add_argument("--num-edits", type=int, default=None,
                   help="edit the records in consecutive chunks of N together (MultiCounterFact protocol: each "
                        "chunk applied to the original model, measured, restored; resumable per chunk; "
                        "conflicting requests within a chunk are dropped); default: one record at a time "
                        "(the single-edit protocol; MEMIT: chunks of 1)")
    p.add_argument("--generation-interval", type=int, default=1,
                   help="with --num-edits: generation metrics only for case_id %% K == 0 (default every case)")
    p.add_argument("--hparams", help="hyperparameters JSON of --method (default: the model's bundled preset)")
    p.add_argument("--skip-generation", action="store_true", help="skip the generation metrics (GE, RS)")
    p.add_argument("--backend", choices=edit_backend_names(), help="implementation of --method (default: fast)")
    p.add_argument("--key-mode", default="reference", choices=["reference", "r-rome"],
                   help="r-rome: the template-mean key k̄ also for the denominator and residual")
    p.add_argument("--sequential", action="store_true",
                   help="accumulate the edits (no restore between cases or batches); one process. With "
                        "--num-edits (AlphaEdit's protocol): batches one after another under the collapse "
                        "monitor (monitor.json, monitor.png), every record measured after the last batch, "
                        "resumable per batch; without: pre/post around each case's own edit, not resumable")
    p.add_argument("--eval-every", type=int, default=None,
                   help="with --sequential --num-edits: also measure the records edited so far after every K "
                        "batches (default: only after the last)")
    p.add_argument("--stop-on-collapse", type=float, default=None, metavar="KL",
                   help="with --sequential --num-edits: end the run, weights restored, when the collapse "
                        "monitor's KL on the probe prompts exceeds KL (nats)")
    p.add_argument("--skip-pre", action="store_true",
                   help="with --sequential --num-edits: do not measure the unedited model")
    p.add_argument("--stats-dir", help="folder of second-moment statistics for ROME "
                                       "(default: $ROME_FAST_CACHE/stats)")
    p.add_argument("--corpus", help="text file for the statistics when they are not cached (default: "
                                    "hparams.mom2_dataset's cached statistics or text file; else WikiText-2, "
                                    "shipped with the package, for the embedded model; else mom2_dataset "
                                    "from the Hugging Face hub, with `datasets`)")
    p.add_argument("--tfidf-dir", help="folder with idf.npy, tfidf_vocab.json and "
                                       "attribute_snippets.json: enables RS (full CounterFact records)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (per case: seed + case_id)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_cmd_eval)

    s = sub.add_parser("eval-summary", help="print the summary of evaluation folders")
    s.add_argument("dirs", nargs="+")
    s.set_defaults(func=_cmd_summarize)
