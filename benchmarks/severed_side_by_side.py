"""The severed-path experiment (the paper's Fig. 3), reference path vs fast engine, in one process.

CPU, the embedded model, the first known facts, the last subject token, the three conditions
(ordinary, attention severed, MLP severed), 10 samples, noise 3σ:
    .venv/bin/python benchmarks/severed_side_by_side.py --facts 5

Prints seconds per fact for each backend, the fast/reference ratio and the largest score
difference, and writes them to benchmarks/results/severed_cpu_<model>.json."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rome_fast import load_model  # noqa: E402
from rome_fast.data import bundled  # noqa: E402
from rome_fast.trace.engine import TraceEngine  # noqa: E402
from rome_fast.trace.noise import collect_embedding_std  # noqa: E402
from rome_fast.trace.severed import SEVER_CHOICES, calculate_severed_flow  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mt = load_model(args.model, device="cpu")
    knowns = json.loads(bundled("known_1000.json").read_text())
    noise = 3 * collect_embedding_std(mt, [k["subject"] for k in knowns])
    engine = TraceEngine(mt)
    rows, worst = [], 0.0
    for fact in knowns[:args.facts]:
        times = {}
        results = {}
        for backend in ("reference", "fast"):
            t0 = time.perf_counter()
            results[backend] = {k: calculate_severed_flow(mt, fact["prompt"], fact["subject"], noise=noise, sever=k,
                                                          backend=backend, **({"engine": engine} if backend == "fast" else {}))
                                for k in SEVER_CHOICES}
            times[backend] = time.perf_counter() - t0
        diff = max(float((results["fast"][k]["scores"] - results["reference"][k]["scores"]).abs().max())
                   for k in SEVER_CHOICES)
        worst = max(worst, diff)
        rows.append(dict(known_id=fact["known_id"], reference_s=times["reference"], fast_s=times["fast"],
                         max_abs_diff=diff))
        print(f"fact {fact['known_id']}: reference {times['reference']:.2f} s, fast {times['fast']:.2f} s, "
              f"max |Δscore| {diff:.2e}")
    ref = statistics.median(r["reference_s"] for r in rows)
    fast = statistics.median(r["fast_s"] for r in rows)
    summary = dict(model=args.model, facts=len(rows), samples=10, noise=noise, token_range="subject_last",
                   conditions=["ordinary", "attn severed", "mlp severed"], threads=args.threads,
                   median_reference_s_per_fact=ref, median_fast_s_per_fact=fast, speedup=ref / fast,
                   max_abs_diff=worst, per_fact=rows, machine=platform.processor() or platform.machine(),
                   torch=torch.__version__,
                   note="shared 2-core CPU machine, other jobs running: timings are noisy")
    print(f"median per fact: reference {ref:.2f} s, fast {fast:.2f} s, speed-up {ref / fast:.1f}x; "
          f"max |Δscore| {worst:.2e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"severed_cpu_{args.model}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
