"""MEMIT (N CounterFact edits at once) next to ROME (the same N cases, one at a time: edit, measure,
restore) on the embedded SmolLM2-135M, CPU.

    OMP_NUM_THREADS=1 python benchmarks/memit_counterfact.py --cases 1000 --work /tmp/cf1000 --methods rome
    OMP_NUM_THREADS=1 python benchmarks/memit_counterfact.py --cases 1000 --work /tmp/cf1000 --methods memit
    python benchmarks/memit_counterfact.py --cases 1000 --work /tmp/cf1000 --methods   # write the results only

Both run through `rome_fast.eval` (the mass-editing protocol: --num-edits N for MEMIT, 1 for ROME),
each method in its own resumable folder under --work; the methods can run in separate processes.
Both use their bundled presets and statistics of the whole WikiText-2 test file. Reports ES, PS,
NS, S, the teacher-forced accuracies, GE (generations of every --generation-interval-th case, the
same cases for both) and the edit time, pre (unedited) and post. Writes
benchmarks/results/memit_counterfact{N}_smollm2.json."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
KEYS = ("S", "ES", "PS", "NS", "rewrite_acc", "paraphrase_acc", "neighborhood_acc", "GE")


def run(method: str, args) -> None:
    import rome_fast
    from rome_fast.eval import evaluate, load_counterfact
    from rome_fast.eval.chunked import method_hparams

    mt = rome_fast.load_model("smollm2-135m", device="cpu")
    records = load_counterfact(DATA / "counterfact-edit.json", limit=args.cases)
    evaluate(mt, "counterfact", records, method_hparams(method, mt.name), Path(args.work) / method,
             method=method, num_edits=args.cases if method == "memit" else 1,
             generation_interval=args.generation_interval, progress=True, backend="fast",
             editor_kwargs={"corpus": str(DATA / "wikitext-2-raw-test.txt"), "progress": args.progress})


def report(args) -> dict:
    from rome_fast.eval import summarize
    res = {"model": "smollm2-135m", "cases": args.cases, "device": "cpu", "threads": args.threads,
           "generation_interval": args.generation_interval,
           "note": args.note + "; GE from the generations of every generation_interval-th case (compact "
                   "records: rewrite prompt + paraphrase, one sample each)", "methods": {}}
    for method in ("memit", "rome"):
        folder = Path(args.work) / method
        if not (folder / "run.json").is_file():
            continue
        s = summarize(folder, print_table=True)
        row = {"cases": s["n"], "chunks": s.get("chunks")}
        for phase in ("pre", "post"):
            row[phase] = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in s[phase].items() if k in KEYS}
            row[phase + "_ci95"] = {k: v["ci95"] for k, v in s[phase].items() if k in KEYS and isinstance(v, dict)}
        res["methods"][method] = row
    # the same cases for both, when one run is not finished (ROME one by one is the slow one)
    done = {m: _cases(Path(args.work) / m) for m in res["methods"]}
    if len(done) == 2 and len(set(map(len, done.values()))) > 1:
        common = set(done["memit"]) & set(done["rome"])
        res["common_cases"] = {"cases": len(common), "methods": {m: _aggregate([c[i] for i in sorted(common)])
                                                                 for m, c in done.items()}}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"memit_counterfact{args.cases}_smollm2.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out}")
    return res


def _cases(folder: Path) -> dict:
    from rome_fast.eval.cases import _load_cases
    return {c["case_id"]: c for c in _load_cases(folder)}


def _aggregate(cases: list) -> dict:
    from rome_fast.eval import metrics as M
    out = {}
    for phase in ("pre", "post"):
        agg = M.aggregate([M.counterfact_case_scores(c[phase]) for c in cases])
        out[phase] = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in agg.items() if k in KEYS}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--work", required=True, help="folder for the runs (resumable)")
    ap.add_argument("--methods", nargs="*", default=["memit", "rome"], choices=["memit", "rome"])
    ap.add_argument("--generation-interval", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="results file (default benchmarks/results/memit_counterfact{N}_smollm2.json)")
    ap.add_argument("--progress", action="store_true", help="progress bars of the edits' steps too (z groups)")
    ap.add_argument("--note", default="shared 2-core CPU with other jobs running: times are indicative only",
                    help="how the machine was used during the runs (goes into the results file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for method in args.methods:
        run(method, args)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
