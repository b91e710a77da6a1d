"""MEMIT or AlphaEdit, reference path vs fast backend, in one process on the embedded SmolLM2-135M (CPU).

    OMP_NUM_THREADS=1 python benchmarks/memit_side_by_side.py [--edits 100]
    python benchmarks/memit_side_by_side.py --method alphaedit --edits 16 --batches 3

N CounterFact requests (the file's first) edited at once by each backend (same seeded context
templates, same statistics file: the whole WikiText-2 test set or --samples articles of it, collected
before anything is timed; each backend reads it from disk
inside its timing, the fast one also factors C, AlphaEdit's also decomposes it for P). With
--batches B, B batches of N are edited one after another, as a sequential run does (AlphaEdit: each
batch sees the keys of the batches before it). Reports the wall time of each call and its phases
(statistics, z, layer updates), their ratio, the relative difference of every edited weight's
total update and of the z vectors, the steps, and ES/PS/NS of all the cases after the last batch.
With several batches, each batch is also edited by the fast backend from the reference's state
before it (weights and K_p): the agreement of one step, apart from the drift of the ones before.
Writes benchmarks/results/memit_cpu.json (alphaedit_cpu.json)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("memit", "alphaedit"), default="memit")
    ap.add_argument("--edits", type=int, default=100, help="requests per batch")
    ap.add_argument("--batches", type=int, default=1, help="batches edited one after another")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None,
                    help="WikiText articles for the statistics (default: the preset's, i.e. the whole file)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/<method>_cpu.json")
    ap.add_argument("--quiet-machine", action="store_true",
                    help="say in the results that nothing else ran on the machine during the run")
    args = ap.parse_args(argv)
    if args.edits < 1 or args.batches < 1:
        ap.error("--edits and --batches must be at least 1")
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{args.method}_cpu.json")
    torch.set_num_threads(args.threads)

    import rome_fast
    from rome_fast.edit import restore_weights
    from rome_fast.edit.memit import MEMITHyperParams, apply_memit_to_model, get_context_templates
    from rome_fast.edit.memit.stats import layer_factors
    from rome_fast.eval import metrics as M
    from rome_fast.eval.chunked import drop_conflicts
    from rome_fast.eval.datasets import load_counterfact

    if args.method == "alphaedit":
        from rome_fast.edit.alphaedit import AlphaEditHyperParams as HParams, apply_alphaedit_to_model, clear_caches
    else:
        from rome_fast.edit.memit import clear_caches
        HParams = MEMITHyperParams

    mt = rome_fast.load_model("smollm2-135m", device="cpu")
    hp = HParams.from_name(mt.name)
    if args.samples is not None:
        hp = dataclasses.replace(hp, mom2_n_samples=args.samples)
    corpus = str(DATA / "wikitext-2-raw-test.txt")
    records, dropped = drop_conflicts(load_counterfact(DATA / "counterfact-edit.json",
                                                       limit=args.edits * args.batches))
    reqs = [r.request() for r in records]
    batches = [reqs[i:i + args.edits] for i in range(0, len(reqs), args.edits)]
    templates = get_context_templates(mt.model, mt.tokenizer, seed=0)
    # the statistics files exist before anything is timed (collecting them is not what is compared)
    layer_factors(mt.model, mt.tokenizer, hp, {l: 1536 for l in hp.layers}, None, corpus, progress=False)
    res = {"method": args.method, "device": "cpu", "threads": args.threads, "model": mt.name,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "edits": len(reqs), "batches": len(batches), "dropped_conflicts": len(dropped),
           "hparams": hp.to_dict(),
           "command": "python benchmarks/memit_side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "note": f"one run of each backend in one process, {args.threads} thread(s), on a 2-core CPU "
                   + ("with nothing else running (one run: the ratio is from this run)" if args.quiet_machine else
                      "with other jobs running (timings are indicative; the ratio is from this one run)")}
    upd, info, quality = {}, {}, {}

    def scores():
        per = [M.counterfact_case_scores(M.counterfact_probs(mt.model, mt.tokenizer, r, accuracy=True))
               for r in records]
        return {k: (v["mean"] if isinstance(v, dict) else v) for k, v in M.aggregate(per).items()}

    res["pre"] = scores()  # the unedited model
    phases = ("setup", "z", "layers")

    def edit(batch, backend, cache_c, call):
        if args.method == "alphaedit":
            _, o, cache_c = apply_alphaedit_to_model(
                mt.model, mt.tokenizer, batch, hp, cache_c=cache_c, return_orig_weights=True, backend=backend,
                context_templates=templates, corpus=corpus, progress=False, return_info=call)
        else:
            _, o = apply_memit_to_model(mt.model, mt.tokenizer, batch, hp, return_orig_weights=True, backend=backend,
                                        context_templates=templates, corpus=corpus, progress=False, return_info=call)
        return o, cache_c

    starts = []  # the reference's state before each batch: (weights, K_p, its own update and z)
    for backend in ("fast", "reference"):
        clear_caches()  # each call reads the statistics from disk
        info[backend], orig, cache_c, per_batch = {"z": []}, {}, {}, []
        for batch in batches:
            call, before = {}, dict(cache_c)
            t0 = time.perf_counter()
            o, cache_c = edit(batch, backend, cache_c, call)
            per_batch.append(dict(call["seconds"], total=time.perf_counter() - t0))
            info[backend]["z"] += call["z"]
            if backend == "reference":
                starts.append((o, before, {n: (mt.model.get_parameter(n) - w).detach().clone() for n, w in o.items()},
                               call["z"]))
            for n, w in o.items():
                orig.setdefault(n, w)  # the weights before the first batch
        info[backend]["per_batch"] = per_batch
        info[backend]["seconds"] = {k: sum(b[k] for b in per_batch) for k in phases}
        info[backend]["wall"] = sum(b["total"] for b in per_batch)
        upd[backend] = {n: (mt.model.get_parameter(n) - w).detach().clone() for n, w in orig.items()}
        quality[backend] = scores()
        restore_weights(mt.model, orig)
        print(backend, f"{info[backend]['wall']:.1f} s", info[backend]["seconds"], quality[backend], flush=True)
    if len(batches) > 1:
        # Each batch again with the fast backend, from the reference's state before it: the
        # agreement of one sequential step, apart from the drift the earlier batches carried in.
        same_start = []
        for batch, (o, before, ref_delta, ref_z) in zip(batches, starts):
            restore_weights(mt.model, o)
            call = {}
            edit(batch, "fast", dict(before), call)
            same_start.append({"rel_diff_update": {n: rel(mt.model.get_parameter(n).detach() - w, ref_delta[n])
                                                   for n, w in o.items()},
                               "rel_diff_z_max": max(rel(a.z, b.z) for a, b in zip(call["z"], ref_z))})
        restore_weights(mt.model, orig)
        res["same_start_per_batch"] = same_start
    f, r = info["fast"], info["reference"]
    res["seconds"] = {b: dict(info[b]["seconds"], total=info[b]["wall"]) for b in info}
    if len(batches) > 1:
        res["seconds_per_batch"] = {b: info[b]["per_batch"] for b in info}
        res["speedup_per_batch"] = [a["total"] / b["total"] for a, b in zip(r["per_batch"], f["per_batch"])]
    res["speedup"] = r["wall"] / f["wall"]
    res["speedup_z"] = r["seconds"]["z"] / f["seconds"]["z"]
    res["speedup_layers"] = r["seconds"]["layers"] / f["seconds"]["layers"]
    res["rel_diff_update"] = {n: rel(upd["fast"][n], upd["reference"][n]) for n in upd["reference"]}
    res["rel_diff_z_max"] = max(rel(a.z, b.z) for a, b in zip(f["z"], r["z"]))
    res["z_steps_equal"] = sum(a.steps == b.steps for a, b in zip(f["z"], r["z"]))
    res["z_steps_mean"] = sum(z.steps for z in r["z"]) / len(r["z"])
    res["post"] = quality
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'':28s}{'reference':>12s}{'fast':>12s}{'speedup':>9s}")
    for k in ("setup", "z", "layers", "total"):
        a, b = res["seconds"]["reference"][k], res["seconds"]["fast"][k]
        print(f"{k + ', s':28s}{a:12.1f}{b:12.1f}{a / b if b else float('nan'):9.2f}")
    print(f"max relative difference of the updates {max(res['rel_diff_update'].values()):.1e}, of z "
          f"{res['rel_diff_z_max']:.1e}; z steps equal for {res['z_steps_equal']}/{len(reqs)}")
    for k, b in enumerate(res.get("same_start_per_batch", []), 1):
        print(f"batch {k} from the reference's state: updates within {max(b['rel_diff_update'].values()):.1e}, "
              f"z within {b['rel_diff_z_max']:.1e}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
