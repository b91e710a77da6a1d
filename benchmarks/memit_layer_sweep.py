"""Which layers and λ MEMIT edits in SmolLM2-135M: a sweep on CounterFact (docs/smollm2_memit_layers.md).

    OMP_NUM_THREADS=1 python benchmarks/memit_layer_sweep.py [--cases 100] [--first 2000]

N CounterFact records (from --first on, held out from the tests and the 1,000-edit benchmark, which
use the file's first records) are edited together with MEMIT (fast backend) for each set of edited
layers and each λ (mom2_update_weight); after each edit, ES/PS/NS (probability comparisons) and the
teacher-forced accuracies of the N records are measured, then the weights are restored. The z
vectors depend only on the z layer (the last edited layer), so they are computed once per z layer.
Statistics: the whole WikiText-2 test file (the preset's 100000 texts take all of it).
Writes benchmarks/results/memit_layer_sweep_smollm2.json."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

LAYER_SETS = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [3, 4, 5, 6, 7], [4, 5, 6, 7, 8], [5, 6, 7, 8, 9], [3, 4, 5]]
LAMBDAS = [500, 1500, 5000, 15000]


def scores(mt, records):
    from rome_fast.eval import metrics as M
    per = [M.counterfact_case_scores(M.counterfact_probs(mt.model, mt.tokenizer, r, accuracy=True))
           for r in records]
    out = M.aggregate(per)
    return {k: (v["mean"] if isinstance(v, dict) else v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--first", type=int, default=2000, help="index of the first record used")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layer-sets", type=json.loads, default=LAYER_SETS)
    ap.add_argument("--lambdas", type=json.loads, default=LAMBDAS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memit_layer_sweep_smollm2.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import rome_fast
    from rome_fast.edit import restore_weights
    from rome_fast.edit.memit import MEMITHyperParams, apply_memit_to_model, compute_zs, get_context_templates
    from rome_fast.edit.rome import normalize_request
    from rome_fast.eval.chunked import drop_conflicts
    from rome_fast.eval.datasets import load_counterfact

    mt = rome_fast.load_model("smollm2-135m", device="cpu")
    corpus = str(DATA / "wikitext-2-raw-test.txt")
    records = load_counterfact(DATA / "counterfact-edit.json")[args.first:args.first + args.cases]
    records, dropped = drop_conflicts(records)
    reqs = [normalize_request(r.request()) for r in records]
    templates = get_context_templates(mt.model, mt.tokenizer, seed=0)
    base = MEMITHyperParams.from_name("smollm2-135m")
    res = {"model": mt.name, "cases": len(records), "first_record": args.first, "dropped_conflicts": len(dropped),
           "threads": args.threads, "statistics": "WikiText-2 test, whole file", "templates": templates,
           "note": "shared 2-core CPU, other jobs running: times are indicative only",
           "pre": scores(mt, records), "runs": []}
    print("pre", res["pre"], flush=True)
    zcache = {}
    for layers in args.layer_sets:
        hp0 = dataclasses.replace(base, layers=layers)
        if layers[-1] not in zcache:
            t0 = time.perf_counter()
            zcache[layers[-1]] = (compute_zs(mt.model, mt.tokenizer, reqs, hp0, templates), time.perf_counter() - t0)
        zs, zsec = zcache[layers[-1]]
        for lam in args.lambdas:
            hp = dataclasses.replace(hp0, mom2_update_weight=lam)
            t0 = time.perf_counter()
            _, orig = apply_memit_to_model(mt.model, mt.tokenizer, reqs, hp, return_orig_weights=True,
                                           context_templates=templates, corpus=corpus, zs=zs, progress=False)
            secs = time.perf_counter() - t0
            upd = {n: float((mt.model.get_parameter(n) - w).norm() / w.norm()) for n, w in orig.items()}
            post = scores(mt, records)
            restore_weights(mt.model, orig)
            row = {"layers": layers, "lambda": lam, "post": post, "z_seconds": zsec, "layer_seconds": secs,
                   "relative_update_norm": upd,
                   "z_steps_mean": sum(z.steps for z in zs) / len(zs),
                   "z_clamped": sum(float(z.delta.norm()) >= 0.999 * hp.clamp_norm_factor * float(z.h_init.norm())
                                    for z in zs)}
            res["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("layers", "lambda")}),
                  {k: round(v, 1) for k, v in post.items() if k in ("S", "ES", "PS", "NS", "rewrite_acc",
                                                                      "paraphrase_acc", "neighborhood_acc")},
                  flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
