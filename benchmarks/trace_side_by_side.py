"""Causal tracing, reference path vs fast engine, side by side in one process.

CPU, the embedded model, 10 known facts, all three kinds (the issue's CPU target):
    .venv/bin/python benchmarks/trace_side_by_side.py --facts 10
GPU, a randomly initialised GPT-2 XL-sized model, prompts of 8–16 tokens:
    python benchmarks/trace_side_by_side.py --random gpt2-xl --facts 8 --dtypes float32,bfloat16

Prints a table per kind and for all kinds (seconds per fact, facts/s, fast/reference ratio, max
|Δscore| against the reference) and writes it with the machine's facts to benchmarks/results/.
The engine's floating-point work is counted with torch's FlopCounterMode and reported as an achieved
rate next to a measured matrix-multiply rate of the same device and dtype.
"""
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

from rome_fast.trace.engine import FactInput, TraceEngine  # noqa: E402
from rome_fast.trace.noise import collect_embedding_std, draw_noise  # noqa: E402
from rome_fast.trace.reference import (predict_from_input, trace_important_states,  # noqa: E402
                                       trace_important_window, trace_with_patch)

KINDS = ("hidden", "mlp", "attn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype, n=2048, reps=5) -> float:
    """Measured dense matmul rate (TFLOP/s) on this device and dtype: the ceiling to compare with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def load_subject(mt, args):
    """(model, facts) where a fact is (input ids, subject range, noise std)."""
    if args.random:
        return _random_facts(mt, args)
    from rome_fast.trace.runner import load_facts
    path = Path(args.facts_file)
    records = load_facts(path)
    std = collect_embedding_std(mt, [r["subject"] for r in records])
    noise = 3 * std
    facts = []
    for r in records:
        ids = mt.tokenizer.encode(r["prompt"])
        from rome_fast.tokens import find_token_range
        b, e = find_token_range(mt.tokenizer, ids, r["subject"])
        facts.append((ids, (b, e), noise))
        if len(facts) == args.facts:
            break
    return facts


def _random_facts(mt, args):
    """Prompts of 8–16 random tokens with a 2–4-token subject from token 1 (GPU timing needs only
    shapes: a forward's cost does not depend on the weights or the words)."""
    g = torch.Generator().manual_seed(0)
    vocab = mt.model.config.vocab_size
    facts = []
    for i in range(args.facts):
        T = 8 + (i * 5) % 9
        n_sub = 2 + i % 3
        ids = torch.randint(100, min(vocab, 30000), (T,), generator=g).tolist()
        facts.append((ids, (1, 1 + n_sub), 0.1))
    return facts


def reference_fact(mt, ids, rng, noise, kinds, samples, window):
    """The reference path for one fact: 2 + T·N passes per kind, as the reference's CLI does."""
    inp = dict(input_ids=torch.tensor([ids] * (samples + 1), device=mt.device),
               attention_mask=torch.ones(samples + 1, len(ids), dtype=torch.long, device=mt.device))
    out = {}
    for kind in kinds:
        answer_t, base = [d[0] for d in predict_from_input(mt.model, inp)]
        low = trace_with_patch(mt.model, inp, [], answer_t, rng, noise=noise).item()
        if kind == "hidden":
            scores = trace_important_states(mt.model, mt.num_layers, inp, rng, answer_t, noise=noise)
        else:
            scores = trace_important_window(mt.model, mt.num_layers, inp, rng, answer_t, kind=kind,
                                            window=window, noise=noise)
        out[kind] = (int(answer_t), float(base), low, scores.float().cpu())
    return out


def main(argv=None, mt=None):
    """`mt`: a model the caller built (benchmarks/gpu_bench.py), used in place of --model/--random
    (which then only names it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random", help="a randomly initialised model of this shape (gpt2-xl, llama-7b, …)")
    p.add_argument("--family", default=None, help="family of the random model (default from --random)")
    p.add_argument("--facts", type=int, default=10)
    p.add_argument("--reference-facts", type=int, default=None,
                   help="run the reference on only the first K facts (it is the slow side); "
                        "its per-fact time is the mean over those")
    p.add_argument("--facts-file", default=str(ROOT.parent / "shared" / "data" / "known_1000.json"))
    p.add_argument("--kinds", default="all")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--dtypes", default="float32", help="fast-path dtypes, e.g. float32,bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--flop-facts", type=int, default=1, help="facts whose FLOPs are counted (a re-run)")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the measured n×n×n matmul")
    p.add_argument("--together-only", action="store_true",
                   help="time the fast path on all kinds together only, not each kind apart (half the time)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # strict fp32, as the reference runs
        torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    kinds = KINDS if args.kinds == "all" else tuple(args.kinds.split(","))
    timed_kinds = ("all",) if args.together_only else kinds + ("all",)

    from rome_fast.models import ModelAndTokenizer, load_model
    if mt is not None:
        model_name = f"random {args.random}" if args.random else args.model
    elif args.random:
        from rome_fast.models.random_init import random_model
        family = args.family or ("llama" if "llama" in args.random else
                                 "gptj" if "gpt-j" in args.random else "gpt2")
        model, tok = random_model(family, size=args.random, device=device)
        mt = ModelAndTokenizer(model=model, tokenizer=tok)
        model_name = f"random {args.random} ({family})"
    else:
        mt = load_model(args.model, device=args.device)
        model_name = args.model
    facts = load_subject(mt, args)
    n_ref = min(len(facts), args.reference_facts or len(facts))

    # reference path, fp32, one fact at a time
    ref_results, ref_time = [], {k: 0.0 for k in kinds}
    for ids, rng, noise in facts[:n_ref]:
        per = {}
        for kind in kinds:
            _sync(device)
            t0 = time.perf_counter()
            per.update(reference_fact(mt, ids, rng, noise, (kind,), args.samples, args.window))
            _sync(device)
            ref_time[kind] += time.perf_counter() - t0
        ref_results.append(per)
        print(f"reference: fact {len(ref_results)}/{n_ref} done", file=sys.stderr, flush=True)

    runs = []
    fp32_scores = None
    base_dtype = next(mt.model.parameters()).dtype
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        mt.model.to(dtype)
        engine = TraceEngine(mt)
        inputs = [FactInput(ids, rng, draw_noise(args.samples, rng[1] - rng[0], mt.adapter.hidden_size, noise))
                  for ids, rng, noise in facts]
        engine.trace(inputs[:1], kinds=kinds, window=args.window)  # warm-up (allocator, kernels)
        per_kind = {}
        for kind in timed_kinds:
            ks = kinds if kind == "all" else (kind,)
            _sync(device)
            t0 = time.perf_counter()
            res = engine.trace(inputs, kinds=ks, window=args.window)
            _sync(device)
            per_kind[kind] = (time.perf_counter() - t0, res)
        from torch.utils.flop_counter import FlopCounterMode
        flop_facts = inputs[:args.flop_facts]  # counting re-runs the work: a sample of facts
        with FlopCounterMode(display=False) as fc:
            engine.trace(flop_facts, kinds=kinds, window=args.window)
        flops_per_fact = fc.get_total_flops() / len(flop_facts)
        rate = matmul_rate(device, dtype, n=args.matmul_n)
        all_res = per_kind["all"][1]
        rows = []
        for kind in timed_kinds:
            dt, res = per_kind[kind]
            ks = kinds if kind == "all" else (kind,)
            ref_s = sum(ref_time[k] for k in ks) / n_ref
            diff = max(float((res[i].scores[k] - ref_results[i][k][3]).abs().max())
                       for i in range(n_ref) for k in ks)
            row = dict(kind=kind, dtype=dname, fast_s_per_fact=dt / len(facts),
                       fast_facts_per_s=len(facts) / dt, ref_s_per_fact=ref_s,
                       ratio=ref_s / (dt / len(facts)), max_abs_dscore_vs_reference=diff)
            if fp32_scores is not None:
                row["max_abs_dscore_vs_fast_fp32"] = max(
                    float((res[i].scores[k] - fp32_scores[i][k]).abs().max())
                    for i in range(len(facts)) for k in ks)
            rows.append(row)
        if dname == "float32":
            fp32_scores = [{k: r.scores[k] for k in kinds} for r in all_res]
        all_dt = per_kind["all"][0]
        runs.append(dict(dtype=dname, rows=rows, engine_flop_per_fact=flops_per_fact,
                         flop_counted_on_facts=len(flop_facts),
                         achieved_tflops=flops_per_fact * len(facts) / all_dt / 1e12, matmul_tflops=rate,
                         oom_splits=engine.splits))
    mt.model.to(base_dtype)

    report = dict(
        model=model_name, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__, facts=len(facts),
        reference_facts=n_ref, samples=args.samples, window=args.window, kinds=list(kinds),
        command=" ".join([Path(sys.executable).name, *sys.argv]), runs=runs,
        when=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"\n{model_name} on {report['device_name']} ({device}, {report['threads']} threads), "
          f"{len(facts)} facts (reference on {n_ref}), S={args.samples}")
    print(f"{'kind':>7} {'dtype':>9} {'ref s/fact':>11} {'fast s/fact':>12} {'facts/s':>8} {'ratio':>7} {'max|Δ|':>9}")
    for run in runs:
        for r in run["rows"]:
            print(f"{r['kind']:>7} {r['dtype']:>9} {r['ref_s_per_fact']:>11.3f} {r['fast_s_per_fact']:>12.3f} "
                  f"{r['fast_facts_per_s']:>8.3f} {r['ratio']:>6.1f}x {r['max_abs_dscore_vs_reference']:>9.2e}")
        print(f"  {run['dtype']}: engine {run['engine_flop_per_fact'] / 1e12:.3f} TFLOP/fact, achieved "
              f"{run['achieved_tflops']:.3f} TFLOP/s vs measured matmul {run['matmul_tflops']:.3f} TFLOP/s")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"trace_{'gpu' if device.type == 'cuda' else 'cpu'}_{(args.random or args.model).replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
