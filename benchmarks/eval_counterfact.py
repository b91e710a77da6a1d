"""CounterFact evaluation of ROME edits on the embedded SmolLM2-135M, written as a results file that
says how it was made.

    OMP_NUM_THREADS=1 python benchmarks/eval_counterfact.py [--limit 100] [--backend fast] \
        [--work DIR] [--out benchmarks/results/eval_counterfact100_smollm2-135m.json]

Runs `rome-fast eval` (the same code path as the shell command; resumable: rerun with the same
--work to finish an interrupted run) on the first --limit records of the shared data folder's
counterfact-edit.json, with the second-moment statistics computed in this run, in --work/stats,
from --corpus (default: WikiText-2, raw test split, as shipped with the package). The results
file holds the summary (pre/post ES, PS, NS, EM, PM, NM, GE, S) with the command, backend,
statistics source, data file digests, versions and thread count; no host names or absolute paths."""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shown(path: Path) -> str:
    """A path as it may appear in a results file: shared/data/<name> for the shared data folder,
    else its file name only."""
    path = Path(path).resolve()
    try:
        return str(Path("shared", "data", path.relative_to(DATA.resolve())))
    except ValueError:
        return path.name


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "rome_fast", "csrc"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=100, help="first N CounterFact records")
    ap.add_argument("--backend", choices=["fast", "reference"], default="fast")
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"), help="CounterFact file")
    ap.add_argument("--corpus", default=None,
                    help="text file for the statistics (default: the bundled WikiText-2 test split)")
    ap.add_argument("--work", default=None, help="folder for the case files and statistics "
                                                 "(default: a new temporary folder); reuse it to resume")
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/"
                                                "eval_counterfact{limit}_smollm2-135m.json)")
    ap.add_argument("--skip-generation", action="store_true", help="no GE (faster)")
    args = ap.parse_args(argv)

    from rome_fast import __version__
    from rome_fast.cli import main as cli
    from rome_fast.edit.corpus import default_corpus

    work = Path(args.work or tempfile.mkdtemp(prefix="rome-eval-cf-"))
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"eval_counterfact{args.limit}_smollm2-135m.json")
    cases, stats = work / "cases", work / "stats"
    cli_args = ["eval", "--dataset", "counterfact", "--data", str(args.data), "--limit", str(args.limit),
                "--backend", args.backend, "--corpus", str(corpus), "--stats-dir", str(stats),
                "--out", str(cases), "--quiet"] + (["--skip-generation"] if args.skip_generation else [])
    resumed = len(list(cases.glob("case_*.json"))) if cases.is_dir() else 0
    t0 = time.perf_counter()
    rc = cli(cli_args)
    if rc:
        return rc
    wall = time.perf_counter() - t0
    summary = json.loads((cases / "summary.json").read_text(encoding="utf-8"))
    run = json.loads((cases / "run.json").read_text(encoding="utf-8"))
    summary.pop("dir", None)
    stats_files = sorted(str(p.relative_to(stats)) for p in stats.rglob("*.npz"))
    import transformers
    result = {
        "command": "OMP_NUM_THREADS={t} python benchmarks/eval_counterfact.py --limit {n} --backend {b}{more}".format(
            t=torch.get_num_threads(), n=args.limit, b=args.backend,
            more=(f" --data {shown(Path(args.data))}" if args.data != ap.get_default("data") else "")
            + (f" --corpus {shown(corpus)}" if args.corpus else "")
            + (" --skip-generation" if args.skip_generation else "")),
        "cli_equivalent": "rome-fast eval --dataset counterfact --data {data} --limit {n} --backend {b} "
                          "--corpus {corpus} --stats-dir {stats}{gen}".format(
                              data=shown(Path(args.data)), n=args.limit, b=args.backend, corpus=shown(corpus) if args.corpus else "<bundled wikitext-2-raw-test.txt>",
                              stats="WORK/stats", gen=" --skip-generation" if args.skip_generation else ""),
        "backend": args.backend,
        "data": {"file": shown(Path(args.data)), "sha256": sha256(Path(args.data)), "records": args.limit},
        "statistics": {"corpus": shown(corpus) if args.corpus else
                       "WikiText-2 raw test split as bundled (rome_fast/data/wikitext-2-raw-test.txt.gz)",
                       "corpus_sha256": sha256(corpus),
                       "computed_by": "this script, into its work folder (no pre-existing cache)", "files": stats_files,
                       "mom2_n_samples": run["hparams"]["mom2_n_samples"] if run.get("hparams") else None},
        "hparams": run.get("hparams"),
        "generation": run.get("generation"),
        "versions": {"rome_fast": __version__, **git_commit(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"arch": platform.machine(), "threads": torch.get_num_threads(),
                    "note": "CPU, shared machine (other jobs running): times are indicative only"},
        "wall_s": wall,
        "cases_finished_before_this_run": resumed,  # a resumed run: wall_s covers the rest only
        **summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    post = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in summary["post"].items()}
    print("post: " + ", ".join(f"{k} {v:.1f}" for k, v in post.items()) + f"  -> {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
