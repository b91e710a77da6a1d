"""Measuring many records together vs one by one: `case_metrics_many` against `case_metrics` per
record, in one process on the embedded SmolLM2-135M (CPU).

    python benchmarks/eval_measure_batching.py [--records 100] [--generation-interval 10] [--threads 2]

The file's first N compact CounterFact records, measured as a mass-editing run measures them (NLLs
and teacher-forced accuracies of every record; GE for case_id % interval == 0). Each way runs
`--repeats` times, alternating; reports the median wall times, their ratio, the largest NLL
difference and the number of generated texts that differ. Writes
benchmarks/results/eval_measure_batching.json."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--generation-interval", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--note", default="", help="how the machine was during the run, kept in the results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_measure_batching.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rome_fast.eval import datasets as D
    from rome_fast.eval.cases import case_metrics, case_metrics_many
    from rome_fast.models.loading import load_model

    mt = load_model()
    records = D.load_counterfact(DATA / "counterfact-edit.json", limit=args.records)
    skip = [r.case_id % args.generation_interval != 0 for r in records]
    ways = {"one_by_one": lambda: [case_metrics(mt, r, skip_generation=s, accuracy=True)
                                   for r, s in zip(records, skip)],
            "together": lambda: case_metrics_many(mt, records, skip, accuracy=True)}
    seconds, results = {k: [] for k in ways}, {}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)
    nll_diff, texts_differ = 0.0, 0
    for a, b in zip(results["one_by_one"], results["together"]):
        for key, rows in a.items():
            if key.endswith("_probs"):
                nll_diff = max([nll_diff] + [abs(x[t] - y[t]) for x, y in zip(rows, b[key])
                                             for t in ("target_new", "target_true")])
            elif key == "text":
                texts_differ += a[key] != b[key]
            elif a[key] != b[key]:
                raise SystemExit(f"{key} differs for case {a}: the batched measurement is wrong")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    out = {"model": mt.name, "records": len(records), "with_generation": skip.count(False),
           "threads": args.threads, "repeats": args.repeats, "seconds": seconds, "median_seconds": med,
           "speedup": med["one_by_one"] / med["together"], "max_nll_difference": nll_diff,
           "records_with_other_texts": texts_differ, "torch": torch.__version__, "python": platform.python_version(),
           "command": shlex.join(["python", "benchmarks/eval_measure_batching.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
           "note": args.note}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(records)} records ({out['with_generation']} with GE), {args.threads} thread(s): one by one "
          f"{med['one_by_one']:.1f} s, together {med['together']:.1f} s, {out['speedup']:.2f}x; "
          f"NLLs within {nll_diff:.2g}, {texts_differ} record(s) with other texts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
