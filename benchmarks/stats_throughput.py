"""Tokens/s of the key-statistics collectors on the embedded SmolLM2-135M (CPU), in one run:
the reference path (`stats.collect_mom2`: padded length batches, a plain forward stopped after the
module) against the fast collector in fp32 and with a bf16 forward, and the fast collector as a
full streamed run (a checkpoint every chunk of 100 texts and the convergence probes).

    OMP_NUM_THREADS=1 python benchmarks/stats_throughput.py [--repeats 3]

Two corpora from ../shared/data: WikiText-2 test articles (long texts, truncated at 2048 tokens)
and CounterFact prompts (short texts, where packing matters). Each configuration runs --repeats
times, interleaved; the table gives medians and the ratio to the reference of the same run.
Writes benchmarks/results/stats_cpu.json."""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--articles", type=int, default=12, help="WikiText-2 articles")
    ap.add_argument("--prompts", type=int, default=1000, help="CounterFact prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stats_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import rome_fast
    from rome_fast.edit import ROMEHyperParams
    from rome_fast.edit.corpus import read_text_file
    from rome_fast.edit.fast_stats import collect_mom2_fast, layer_stats_fast
    from rome_fast.edit.stats import collect_mom2, context_length, sample_order

    mt = rome_fast.load_model("smollm2-135m", device="cpu")
    model, tok = mt.model, mt.tokenizer
    hp = ROMEHyperParams.from_name(mt.name)
    wname = hp.rewrite_module_tmp.format(hp.layers[0])
    maxlen = context_length(model)
    wiki = read_text_file(DATA / "wikitext-2-raw-test.txt")
    cf = json.loads((DATA / "counterfact-edit.json").read_text())
    corpora = {"wikitext articles": [wiki[i] for i in sample_order(len(wiki), args.articles)],
               "counterfact prompts": [r["prompt"] for r in cf[:args.prompts]]}
    work = Path(tempfile.mkdtemp(prefix="rome-stats-throughput-"))

    def streamed(texts):
        out = {}
        st = layer_stats_fast(model, tok, wname, work, "bench", corpus=texts, progress=False, stats_out=out,
                              checkpoint_texts=100, force_recompute=True)
        return st.mom2, out["seconds"]

    def timed(fn):
        t = time.perf_counter()
        stat = fn()
        return stat, time.perf_counter() - t

    paths = {
        "reference": lambda texts: timed(lambda: collect_mom2(model, tok, [wname], texts, maxlen, 3 * maxlen,
                                                              progress=False)[wname]),
        "fast fp32": lambda texts: timed(lambda: collect_mom2_fast(model, tok, [wname], texts, maxlen, 3 * maxlen,
                                                                   progress=False)[wname]),
        "fast bf16 forward": lambda texts: timed(lambda: collect_mom2_fast(
            model, tok, [wname], texts, maxlen, 3 * maxlen, act_dtype="bfloat16", progress=False)[wname]),
        "fast fp32, streamed run (checkpoint every 100 texts, probes)": streamed,
    }
    res = {"model": mt.name, "module": wname, "device": "cpu", "threads": args.threads, "repeats": args.repeats,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "note": ("a shared 2-core machine (other jobs running): medians of interleaved repeats, ratios "
                    "against the reference path of the same run; the streamed run's time excludes loading "
                    "the corpus and computing the probe keys"),
           "corpora": {}}
    for cname, texts in corpora.items():
        times = {p: [] for p in paths}
        stats = {}
        for _ in range(args.repeats):
            for p, fn in paths.items():
                stats[p], dt = fn(texts)
                times[p].append(dt)
        n = stats["reference"].count
        ref = stats["reference"].mom2.double()
        rows = {}
        for p in paths:
            assert stats[p].count == n, (p, stats[p].count, n)
            med = statistics.median(times[p])
            rows[p] = {"median_s": med, "tokens_per_s": n / med,
                       "speedup_vs_reference": statistics.median(times["reference"]) / med,
                       "rel_diff_vs_reference": float((stats[p].mom2.double() - ref).norm() / ref.norm()),
                       "all_s": times[p]}
        res["corpora"][cname] = {"texts": len(texts), "tokens": n, "paths": rows}
        print(f"\n{cname}: {len(texts)} texts, {n} tokens")
        print(f"{'path':62s}{'tok/s':>9s}{'x ref':>7s}  rel. diff")
        for p, r in rows.items():
            print(f"{p:62s}{r['tokens_per_s']:9.0f}{r['speedup_vs_reference']:7.2f}  {r['rel_diff_vs_reference']:.1e}")
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
