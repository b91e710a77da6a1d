"""ROME editing, reference path vs fast backend, in one process on the embedded SmolLM2-135M (CPU).

    OMP_NUM_THREADS=1 python benchmarks/edit_side_by_side.py [--articles 16] [--sequential 10]

Measures (same seeded context templates, same statistics file for both paths):
* statistics: tokens/s collecting one layer's second moment from a small WikiText-2 sample
  (reference `layer_stats` collector vs the fast packed collector), and their relative difference;
* seconds per edit with statistics and C⁻¹ / the factor already cached (a warm-up edit first),
  and the max relative difference of the weight updates;
* N sequential edits (CounterFact requests), total seconds and the weights' relative difference;
* the update alone: the reference's fp32 inverse (cached and uncached) + outer product + add vs
  the fused `rome_update_` on the cached Cholesky factor;
* the fast collector with a bf16 forward (AMX / AVX-512-BF16 CPUs, tensor cores), and what it
  changes: CounterFact metrics of N cases edited with bf16 statistics vs fp32 statistics.
Writes benchmarks/results/edit_cpu.json and prints a table."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--articles", type=int, default=16, help="WikiText-2 articles for the statistics")
    ap.add_argument("--sequential", type=int, default=10, help="N sequential edits")
    ap.add_argument("--edits", type=int, default=3, help="single edits timed per backend")
    ap.add_argument("--paragraphs", type=int, default=300, help="short texts for the packing measurement")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edit_cpu.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats-only", action="store_true",
                    help="time the statistics collectors only (merged into an existing --out file)")
    ap.add_argument("--eval-cases", type=int, default=20,
                    help="CounterFact cases edited with fp32 and with bf16 statistics (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tempfile

    import rome_fast
    from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, get_context_templates, restore_weights
    from rome_fast.edit.compute_u import clear_cache as clear_inv
    from rome_fast.edit.corpus import read_text_file
    from rome_fast.edit.fast import layer_factor
    from rome_fast.edit.fast_stats import collect_mom2_fast
    from rome_fast.edit.solve_update import clear_factor_cache, rome_update_, rome_update_ref
    from rome_fast.edit.stats import collect_mom2, context_length
    from rome_fast.eval.datasets import load_counterfact

    mt = rome_fast.load_model("smollm2-135m", device="cpu")
    model, tok = mt.model, mt.tokenizer
    hp = ROMEHyperParams.from_name(mt.name)
    hp.mom2_n_samples = args.articles
    layer = hp.layers[0]
    wname = hp.rewrite_module_tmp.format(layer)
    corpus = DATA / "wikitext-2-raw-test.txt"
    res = {"device": "cpu", "threads": args.threads, "model": mt.name, "layer": layer,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "note": f"{args.threads} thread(s); statistics from {args.articles} WikiText-2 test "
                   "articles (not 100k Wikipedia articles)"}

    # ---- statistics -------------------------------------------------------------------------
    import random
    texts = read_text_file(corpus)
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    sample = [texts[i] for i in order[:args.articles]]
    maxlen = context_length(model)
    R = 2  # statistics timings: best of two, so no path pays for a cold start
    t_ref, ref = timed(lambda: collect_mom2(model, tok, [wname], sample, maxlen, 3 * maxlen, progress=False), R)
    info = {}
    t_fast, fast = timed(lambda: collect_mom2_fast(model, tok, [wname], sample, maxlen, 3 * maxlen,
                                                   progress=False, stats_out=info), R)
    n = ref[wname].count
    t_bf, bf = timed(lambda: collect_mom2_fast(model, tok, [wname], sample, maxlen, 3 * maxlen,
                                               act_dtype="bfloat16", progress=False), R)
    res["stats"] = {"texts": f"{args.articles} whole articles (truncated at {maxlen} tokens)", "tokens": n,
                    "reference_s": t_ref, "fast_s": t_fast, "reference_tok_s": n / t_ref,
                    "fast_tok_s": n / t_fast, "speedup": t_ref / t_fast,
                    "rel_diff": rel(fast[wname].mom2, ref[wname].mom2),
                    "fast_bf16_s": t_bf, "fast_bf16_tok_s": n / t_bf, "bf16_speedup": t_ref / t_bf,
                    "bf16_rel_diff": rel(bf[wname].mom2, ref[wname].mom2)}
    # short, variable-length texts (paragraphs): where the reference pads and packing does not
    paras = [p.strip() for p in corpus.read_text(encoding="utf-8").splitlines()
             if p.strip() and not p.strip().startswith("=")]
    random.Random(1).shuffle(paras)
    paras = paras[:args.paragraphs]
    t_pr, pr = timed(lambda: collect_mom2(model, tok, [wname], paras, maxlen, 3 * maxlen, progress=False), R)
    t_pf, pf = timed(lambda: collect_mom2_fast(model, tok, [wname], paras, maxlen, 3 * maxlen, progress=False), R)
    t_pb, pb = timed(lambda: collect_mom2_fast(model, tok, [wname], paras, maxlen, 3 * maxlen,
                                               act_dtype="bfloat16", progress=False), R)
    n_p = pr[wname].count
    two = [hp.rewrite_module_tmp.format(l) for l in (layer - 1, layer)]
    t_2r = sum(timed(lambda nm=nm: collect_mom2(model, tok, [nm], paras, maxlen, 3 * maxlen,
                                                progress=False))[0] for nm in two)
    t_2f, p2 = timed(lambda: collect_mom2_fast(model, tok, two, paras, maxlen, 3 * maxlen, progress=False))
    res["stats_paragraphs"] = {"texts": f"{len(paras)} WikiText-2 paragraphs", "tokens": n_p,
                               "reference_tok_s": n_p / t_pr, "fast_tok_s": n_p / t_pf,
                               "speedup": t_pr / t_pf, "rel_diff": rel(pf[wname].mom2, pr[wname].mom2),
                               "fast_bf16_tok_s": n_p / t_pb, "bf16_speedup": t_pr / t_pb,
                               "bf16_rel_diff": rel(pb[wname].mom2, pr[wname].mom2),
                               "two_layers_reference_two_passes_s": t_2r,
                               "two_layers_fast_one_pass_s": t_2f, "two_layers_speedup": t_2r / t_2f}

    if args.stats_only:  # keep the other sections of an earlier run's file
        old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        old.update(res)
        Path(args.out).write_text(json.dumps(old, indent=2) + "\n")
        print(json.dumps({k: res[k] for k in ("stats", "stats_paragraphs")}, indent=1))
        return 0

    # ---- per-edit ---------------------------------------------------------------------------
    stats_dir = Path(tempfile.mkdtemp(prefix="rome-bench-stats-"))
    from rome_fast.edit.stats import layer_stats
    layer_stats(model, tok, wname, stats_dir, corpus.stem, sample_size=args.articles, corpus=str(corpus),
                progress=False)  # one file both paths read
    templates = get_context_templates(model, tok, hp.context_template_length_params, seed=0)
    records = load_counterfact(DATA / "counterfact-edit.json", limit=args.sequential + args.edits + 1)
    reqs = [r.request() for r in records]
    kw = dict(context_templates=templates, stats_dir=stats_dir, corpus=str(corpus), progress=False)
    W = model.get_parameter(wname + ".weight")
    W0 = W.detach().clone()

    def edit(backend, rs):
        _, orig = apply_rome_to_model(model, tok, rs, hp, return_orig_weights=True, backend=backend, **kw)
        upd = W.detach() - W0
        restore_weights(model, orig)
        assert torch.equal(W, W0)
        return upd

    clear_inv(), clear_factor_cache()
    first = {b: timed(lambda b=b: edit(b, reqs[:1]))[0] for b in ("reference", "fast")}  # loads C, inverts / factors
    per = {"reference": [], "fast": []}
    diffs = []
    for r in reqs[1:1 + args.edits]:
        t_r, u_r = timed(lambda: edit("reference", [r]))
        t_f, u_f = timed(lambda: edit("fast", [r]))
        per["reference"].append(t_r)
        per["fast"].append(t_f)
        diffs.append(rel(u_f, u_r))
    mean = {b: sum(v) / len(v) for b, v in per.items()}
    res["per_edit"] = {"edits": args.edits, "reference_s": mean["reference"], "fast_s": mean["fast"],
                       "speedup": mean["reference"] / mean["fast"], "max_rel_diff_update": max(diffs),
                       "first_edit_s (loads stats, inverse / factor)": first,
                       "value_steps": hp.v_num_grad_steps, "templates": len(templates)}

    # ---- sequential ------------------------------------------------------------------------
    seq = reqs[1 + args.edits:1 + args.edits + args.sequential]
    t_sr, u_sr = timed(lambda: edit("reference", seq))
    t_sf, u_sf = timed(lambda: edit("fast", seq))
    res["sequential"] = {"n": len(seq), "reference_s": t_sr, "fast_s": t_sf, "speedup": t_sr / t_sf,
                         "rel_diff_update": rel(u_sf, u_sr),
                         "rel_diff_weights": rel(W0 + u_sf, W0 + u_sr)}

    # ---- the update alone ------------------------------------------------------------------
    fac = layer_factor(model, tok, hp, layer, stats_dir, str(corpus), False)
    C = layer_stats(model, tok, wname, stats_dir, corpus.stem, sample_size=args.articles,
                    corpus=str(corpus), progress=False).mom2.moment().float()
    layout = mt.adapter.weight_layout
    g = torch.Generator().manual_seed(0)
    kbar = torch.randn(C.shape[0], generator=g).abs()
    kstar = kbar + 0.1 * torch.randn(C.shape[0], generator=g)
    resid = torch.randn(W.numel() // C.shape[0], generator=g)
    Wc = W0.clone()
    C_inv = torch.inverse(C)
    rep = 20
    t_inv, _ = timed(lambda: rome_update_ref(Wc, C, kbar, kstar, resid, layout), repeat=5)
    t_cached, _ = timed(lambda: rome_update_ref(Wc, None, kbar, kstar, resid, layout, C_inv=C_inv), repeat=rep)
    t_fused, _ = timed(lambda: rome_update_(Wc, fac, kbar, kstar, resid, layout), repeat=rep)
    Wa, Wb = W0.clone(), W0.clone()
    rome_update_ref(Wa, None, kbar, kstar, resid, layout, C_inv=C_inv)
    rome_update_(Wb, fac, kbar, kstar, resid, layout)
    res["update"] = {"shape": list(W.shape), "reference_uncached_inverse_s": t_inv,
                     "reference_cached_inverse_s": t_cached, "fused_s": t_fused,
                     "speedup_vs_cached": t_cached / t_fused, "speedup_vs_uncached": t_inv / t_fused,
                     "rel_diff_update": rel(Wb - W0, Wa - W0), "factor": repr(fac)}

    # ---- bf16 statistics: what they change in the edits ----------------------------------------
    if args.eval_cases:
        import dataclasses

        from rome_fast.eval import evaluate
        cases = load_counterfact(DATA / "counterfact-edit.json", limit=args.eval_cases)
        got = {}
        for act in ("float32", "bfloat16"):
            hp_act = dataclasses.replace(hp, mom2_act_dtype=None if act == "float32" else act)
            t0 = time.perf_counter()
            summary = evaluate(mt, "counterfact", cases, hp_act, Path(tempfile.mkdtemp(prefix="rome-bench-eval-")),
                               skip_generation=True, progress=False, backend="fast",
                               editor_kwargs=dict(stats_dir=stats_dir, context_templates=templates,
                                                  corpus=str(corpus), progress=False))
            post = summary["post"]
            got[act] = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in post.items()}
            got[act]["seconds"] = time.perf_counter() - t0
        keys = [k for k in got["float32"] if k != "seconds"]
        res["bf16_stats_eval"] = {"cases": args.eval_cases, "post_fp32_stats": got["float32"],
                                  "post_bf16_stats": got["bfloat16"],
                                  "max_abs_diff_points": max(abs(got["float32"][k] - got["bfloat16"][k])
                                                             for k in keys)}

    res["command"] = " ".join(["python", "benchmarks/edit_side_by_side.py",
                               *(sys.argv[1:] if argv is None else argv)])
    res["timing"] = ("statistics and the update alone: the best of their repeats; per edit: the mean of "
                     "--edits edits; sequential: one run. Not medians")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    s, p, q, u = res["stats"], res["per_edit"], res["sequential"], res["update"]
    print(f"{'':34s}{'reference':>12s}{'fast':>12s}{'speedup':>9s}  rel. diff")
    print(f"{'statistics, tokens/s (1 layer)':34s}{s['reference_tok_s']:12.0f}{s['fast_tok_s']:12.0f}"
          f"{s['speedup']:9.2f}  {s['rel_diff']:.1e}")
    s2 = res["stats_paragraphs"]
    print(f"{'statistics, tokens/s (paragraphs)':34s}{s2['reference_tok_s']:12.0f}{s2['fast_tok_s']:12.0f}"
          f"{s2['speedup']:9.2f}  {s2['rel_diff']:.1e}")
    print(f"{'statistics, bf16 forward, tokens/s':34s}{s['reference_tok_s']:12.0f}{s['fast_bf16_tok_s']:12.0f}"
          f"{s['bf16_speedup']:9.2f}  {s['bf16_rel_diff']:.1e}")
    print(f"{'statistics, 2 layers (paragr.), s':34s}{s2['two_layers_reference_two_passes_s']:12.1f}"
          f"{s2['two_layers_fast_one_pass_s']:12.1f}{s2['two_layers_speedup']:9.2f}")
    print(f"{'seconds per edit':34s}{p['reference_s']:12.2f}{p['fast_s']:12.2f}{p['speedup']:9.2f}  "
          f"{p['max_rel_diff_update']:.1e}")
    print(f"{f'{q[chr(110)]} sequential edits, s':34s}{q['reference_s']:12.2f}{q['fast_s']:12.2f}"
          f"{q['speedup']:9.2f}  {q['rel_diff_update']:.1e}")
    print(f"{'update alone (cached inverse), ms':34s}{1e3 * u['reference_cached_inverse_s']:12.2f}"
          f"{1e3 * u['fused_s']:12.2f}{u['speedup_vs_cached']:9.2f}  {u['rel_diff_update']:.1e}")
    print(f"{'update alone (with inverse), ms':34s}{1e3 * u['reference_uncached_inverse_s']:12.2f}"
          f"{1e3 * u['fused_s']:12.2f}{u['speedup_vs_uncached']:9.2f}")
    if "bf16_stats_eval" in res:
        e = res["bf16_stats_eval"]
        print(f"CounterFact, {e['cases']} cases, bf16 vs fp32 statistics: metrics differ by at most "
              f"{e['max_abs_diff_points']:.2f} points")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
