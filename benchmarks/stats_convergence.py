"""How many texts do the key statistics need? ROME edits of the same CounterFact cases on the
embedded SmolLM2-135M (CPU) with statistics from 1/16, 1/4 and all of the texts the shared data
offers, and from the point where `--until-converged` stops.

    OMP_NUM_THREADS=1 python benchmarks/stats_convergence.py [--cases 50] [--tol 0.3] [--work DIR]

The corpus is every text of ../shared/data, deduplicated: the WikiText-2 test articles, the
known_1000 prompts, the CounterFact prompts, paraphrases and neighbourhood prompts, and the zsRE
questions, paraphrases and NQ questions. It is written as a JSONL file (so the JSONL reader is
what reads it) and sampled as the reference samples (Random(1) order, truncation at the context).
The edited cases' own prompts are part of that corpus (it is all the shared data offers).

For each statistics size: the collection (texts, tokens, seconds), the CounterFact metrics after
the edit (fast backend, no generation; ES/PS/NS and S with 95% intervals, EM/PM/NM), and how far
the edit direction u = C⁻¹k̄/‖C⁻¹k̄‖ of each case is from the one with all texts (1 − cos).
The convergence run uses the edited requests' keys as probes and records its curve.
Writes benchmarks/results/stats_convergence_smollm2.json and prints a table."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def shared_texts() -> tuple[list[str], dict]:
    """Every text of the shared data, first occurrence kept: (texts, count per source)."""
    from rome_fast.edit.corpus import read_text_file
    sources = {"wikitext-2 articles": read_text_file(DATA / "wikitext-2-raw-test.txt")}
    known = json.loads((DATA / "known_1000.json").read_text())
    sources["known_1000 prompts"] = [r["prompt"] for r in known]
    cf = json.loads((DATA / "counterfact-edit.json").read_text())
    sources["counterfact prompts, paraphrases, neighbourhood prompts"] = [
        r[k] for r in cf for k in ("prompt", "rephrase_prompt", "locality_prompt")]
    zs = json.loads((DATA / "zsre_mend_train-1k.json").read_text())
    sources["zsre questions, paraphrases, NQ questions"] = [r[k] for r in zs for k in ("src", "rephrase", "loc")]
    seen, texts, counts = set(), [], {}
    for name, items in sources.items():
        n = 0
        for t in items:
            t = t.strip()
            if t and t not in seen:
                seen.add(t)
                texts.append(t)
                n += 1
        counts[name] = n
    return texts, counts


def _max_abs_diff(a, b) -> float:
    """The largest difference between the numbers of two equally shaped JSON values."""
    if isinstance(a, dict):
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(float(a) - float(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=50, help="CounterFact cases (the first N of counterfact-edit.json)")
    # 0.1 is not reached within the 32k texts here (the all-texts curve ends at 0.14): 0.3 stops
    # between the 1/4 and the whole sample
    ap.add_argument("--tol", type=float, default=0.3, help="the --until-converged tolerance")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-texts", type=int, default=None,
                    help="a random subset of the corpus this large (a quick check of the script only)")
    ap.add_argument("--work", default=None,
                    help="folder for the corpus, statistics and case files (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stats_convergence_smollm2.json"))
    ap.add_argument("--check-reused", type=int, default=1,
                    help="with case files of an earlier run in --work: recompute this many of each and compare")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import rome_fast
    from rome_fast.edit import ROMEHyperParams, get_context_templates
    from rome_fast.edit.compute_u import template_keys
    from rome_fast.edit.fast_stats import layer_stats_fast
    from rome_fast.eval import evaluate
    from rome_fast.eval.datasets import load_counterfact

    work = Path(args.work or tempfile.mkdtemp(prefix="rome-stats-convergence-"))
    work.mkdir(parents=True, exist_ok=True)
    texts, counts = shared_texts()
    if args.max_texts:
        from rome_fast.edit.stats import sample_order
        texts = [texts[i] for i in sorted(sample_order(len(texts), args.max_texts, seed=0))]
        counts = {"random subset (--max-texts)": len(texts)}
    corpus = work / "shared_texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    n_all = len(texts)

    mt = rome_fast.load_model("smollm2-135m", device="cpu")
    model, tok = mt.model, mt.tokenizer
    hp = ROMEHyperParams.from_name(mt.name)
    layer = hp.layers[0]
    wname = hp.rewrite_module_tmp.format(layer)
    stats_dir = work / "stats"
    cases = load_counterfact(DATA / "counterfact-edit.json", limit=args.cases)
    requests = [c.request() for c in cases]
    templates = get_context_templates(model, tok, hp.context_template_length_params, seed=0)

    res = {"model": mt.name, "layer": layer, "module": wname, "device": "cpu", "threads": args.threads,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "note": ("a shared 2-core machine (other jobs running): the seconds are indicative only; "
                    f"{args.cases} CounterFact cases (the first of counterfact-edit.json), fast ROME backend, "
                    "no generation metrics, the same seeded context templates for every run"),
           "corpus": {"texts": n_all, "by_source": counts, "file": "every text of the shared data (JSONL)",
                      "note": "the edited cases' own prompts are among these texts"},
           "tol": args.tol, "runs": {}}

    # ---- statistics -------------------------------------------------------------------------
    def collect(label, **kw):
        out = {}
        st = layer_stats_fast(model, tok, wname, stats_dir, corpus=str(corpus), progress=False, stats_out=out,
                              probe_requests=requests, **kw)
        if not out:  # cached by an earlier run in --work: its convergence record has the run's figures
            rec = json.loads(st.path.with_name(st.path.name[:-len(".npz")] + ".convergence.json").read_text())
            out = {"texts": rec["texts"], "seconds": rec["seconds"], "converged": rec["converged"],
                   "local_tokens": rec["tokens_per_s_rank0"] * rec["seconds"], "cached": True,
                   "curve": [{**p, "median_change": {wname: p["median_change"]}} for p in rec["curve"]]}
        info = {"texts": out["texts"], "keys": st.mom2.count, "seconds": out["seconds"],
                "tokens_per_s": out["local_tokens"] / out["seconds"], "file": st.path.name,
                "sample_size": st.sample_size, "reused_from_earlier_run": bool(out.get("cached"))}
        print(f"{label:>16}: {out['texts']} texts, {st.mom2.count} keys, {out['seconds']:.0f} s", flush=True)
        return st, info, out

    sizes = {"1/16": math.ceil(n_all / 16), "1/4": math.ceil(n_all / 4), "all": n_all}
    stats = {}
    for label, n in sizes.items():
        stats[label], res["runs"][label], out = collect(label, sample_size=n)
        if label == "all":
            res["curve_all_texts"] = [{"texts": p["texts"], "keys": p["keys"], "max_change": p["max_change"],
                                       "median_change": p["median_change"][wname]} for p in out["curve"]]
    stats["converged"], res["runs"]["converged"], out = collect("converged", sample_size=None,
                                                                until_converged=args.tol)
    res["runs"]["converged"]["converged"] = out["converged"]
    res["runs"]["converged"]["curve"] = [{"texts": p["texts"], "keys": p["keys"], "max_change": p["max_change"]}
                                         for p in out["curve"]]

    # ---- how far each edit direction moves --------------------------------------------------
    kbars = torch.stack([template_keys(model, tok, r, hp, layer, templates).mean(0) for r in requests]).double()

    def directions(st):
        C = st.mom2.moment().double()
        u = torch.linalg.solve(C, kbars.T).T
        return u / u.norm(dim=1, keepdim=True)
    u_all = directions(stats["all"])
    for label, st in stats.items():
        dev = 1 - (directions(st) * u_all).sum(1)
        res["runs"][label]["u_one_minus_cos_vs_all"] = {"mean": float(dev.mean()), "max": float(dev.max())}

    # ---- the edits ------------------------------------------------------------------------------
    def run_cases(hp_n, folder, records):
        return evaluate(mt, "counterfact", records, hp_n, folder, skip_generation=True, progress=False,
                        backend="fast", editor_kwargs=dict(stats_dir=stats_dir, context_templates=templates,
                                                           corpus=str(corpus), progress=False))

    for label, st in stats.items():
        hp_n = dataclasses.replace(hp, mom2_n_samples=st.sample_size)
        folder = work / "eval" / label.replace("/", "_")
        reused = sorted(folder.glob("case_*.json"), key=lambda f: int(f.stem.split("_")[1]))
        t0 = time.perf_counter()
        summary = run_cases(hp_n, folder, cases)
        res["runs"][label]["cases_reused_from_earlier_run"] = len(reused)
        if reused and args.check_reused:  # the earlier run's cases must be what this code computes
            ids = {int(f.stem.split("_")[1]) for f in reused[:args.check_reused]}
            again = work / "recheck" / folder.name
            shutil.rmtree(again, ignore_errors=True)
            run_cases(hp_n, again, [c for c in cases if c.case_id in ids])
            diffs = [_max_abs_diff(json.loads((folder / f"case_{i}.json").read_text())["post"],
                                   json.loads((again / f"case_{i}.json").read_text())["post"]) for i in sorted(ids)]
            res["runs"][label]["reused_cases_recomputed"] = {"cases": sorted(ids), "max_abs_diff_post_nll": max(diffs)}
            print(f"{label:>16}: reused {len(reused)} case files; recomputed {sorted(ids)}: "
                  f"max |diff| of the post-edit NLLs {max(diffs):.2e}", flush=True)
        post = summary["post"]
        res["runs"][label]["post"] = {k: ({"mean": v["mean"], "ci95": v["ci95"]} if isinstance(v, dict) else v)
                                      for k, v in post.items()}
        res["runs"][label]["edit_seconds"] = time.perf_counter() - t0
        if "pre" not in res:
            res["pre"] = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in summary["pre"].items()}
        print(f"{label:>16}: S {post['S']:.1f}  ES {post['ES']['mean']:.1f}  PS {post['PS']['mean']:.1f}  "
              f"NS {post['NS']['mean']:.1f}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'statistics':>16} {'texts':>7} {'keys':>8} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6}  1-cos(u,u_all)")
    for label, r in res["runs"].items():
        p = r["post"]
        print(f"{label:>16} {r['texts']:7d} {r['keys']:8d} {p['ES']['mean']:6.1f} {p['PS']['mean']:6.1f} "
              f"{p['NS']['mean']:6.1f} {p['S']:6.1f}  {r['u_one_minus_cos_vs_all']['mean']:.2e}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
