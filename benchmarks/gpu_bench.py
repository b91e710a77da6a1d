"""The GPU suite's benchmarks (docs/gpu.md): rome_fast's fast paths against the reference paths on
random-weight models of real sizes, each figure written next to its target.

    python benchmarks/gpu_bench.py --parts DIR trace:gpt2-xl edit:gpt2-xl update stats:gpt2-xl
    python benchmarks/gpu_bench.py --parts DIR --quick trace:gpt2-xl ...   # tiny models, CPU, seconds
    python benchmarks/gpu_bench.py merge --parts DIR --out gpu_h200.json

Steps (STEP or STEP:MODEL, MODEL one of gpt2-xl, llama-7b):
* trace  — reference path vs fast engine, strict fp32 (TF32 off) and bf16 (benchmarks/
  trace_side_by_side.py on a model built here); s/fact, ratio, max |Δscore|, 1,209 facts × 3 kinds
  extrapolated; roofline: the engine's TFLOP/s (FlopCounterMode) vs a large matmul, both dtypes.
* edit   — seconds per ROME edit, reference vs fast backend, statistics a random SPD matrix written
  as a statistics file both read, context templates given (no sampling).
* update — W += u rᵀ (the compiled rank-k kernel) as GB/s against a device-to-device copy of the
  same bytes, rotating over enough buffers to spill the L2; the whole fused rome_update_ and the
  reference's update beside it.
* stats  — tokens/s of the reference and the fast statistics collector, fp32 and bf16 forward.

Prompts and subjects are random token ids; weights are random (a forward costs the same whatever
their values). Each step writes DIR/<step>_<model>.json ("rows", "targets", "env", "raw") even when
it fails ("error"); `merge` folds the parts, the suite's step log and the CUDA tests' junit file into
one results file. `--profile auto` (default) adds a torch.profiler summary of one representative call
to a step whose target is missed."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Targets on the H200 for the GPT-2 XL shape (issue 11), and the fidelity the project promises.
# name: (label, comparison, value, unit)
TARGETS = {
    "trace_fp32_speedup": ("trace, strict fp32: reference / fast time", ">=", 8.0, "x"),
    "trace_bf16_speedup": ("trace, bf16: reference (fp32) / fast time", ">=", 50.0, "x"),
    "trace_1209x3_bf16_minutes": ("trace 1,209 facts x 3 kinds, bf16 (extrapolated)", "<=", 10.0, "min"),
    "trace_fp32_max_dscore": ("trace fp32: max abs(score fast - reference)", "<=", 1e-4, ""),
    "edit_speedup": ("ROME edit: reference / fast time per edit", ">=", 5.0, "x"),
    "edit_max_rel_diff": ("ROME edit fp32: relative difference of the update", "<=", 1e-4, ""),
    "update_fp32_copy_fraction": ("W += u r^T (fp32 W) vs copy bandwidth", ">=", 0.70, ""),
    "update_bf16_copy_fraction": ("W += u r^T (bf16 W) vs copy bandwidth", ">=", 0.70, ""),
    "stats_bf16_speedup": ("statistics: fast bf16 forward / reference tokens/s", ">=", 3.0, "x"),
}
TARGET_MODEL = "gpt2-xl"
MODELS = {"gpt2-xl": "gpt2", "llama-7b": "llama"}  # shape (random_init.SHAPES) -> family

# What each step runs, on a GPU and in the CPU quick mode.
PLAN = {
    ("trace", "gpt2-xl"): dict(facts=8, reference_facts=2, kinds="all", dtypes="float32,bfloat16",
                               matmul_n=8192, together_only=True),
    ("trace", "llama-7b"): dict(facts=8, reference_facts=1, kinds="hidden", dtypes="bfloat16",
                                matmul_n=8192, together_only=True),
    ("edit", "gpt2-xl"): dict(edits=2, v_steps=None, layer=None),
    ("edit", "llama-7b"): dict(edits=2, v_steps=None, layer=5),
    ("stats", "gpt2-xl"): dict(texts=128, words=(30, 1500)),
    ("stats", "llama-7b"): dict(texts=64, words=(30, 1500)),
    ("update", None): dict(shapes=("gpt2-xl", "llama-7b"), target_shape="gpt2-xl"),
}
QUICK = {
    ("trace", "gpt2-xl"): dict(facts=3, reference_facts=1, kinds="all", dtypes="float32,bfloat16",
                               matmul_n=128, together_only=True),
    ("trace", "llama-7b"): dict(facts=2, reference_facts=1, kinds="hidden", dtypes="bfloat16",
                                matmul_n=128),
    ("edit", "gpt2-xl"): dict(edits=1, v_steps=3, layer=1),
    ("edit", "llama-7b"): dict(edits=1, v_steps=3, layer=1),
    ("stats", "gpt2-xl"): dict(texts=16, words=(5, 60)),
    ("stats", "llama-7b"): dict(texts=16, words=(5, 60)),
    ("update", None): dict(shapes=("tiny",), target_shape="tiny"),  # targets evaluated: plumbing
}
FACTS_FOR_EXTRAPOLATION = 1209


# ---- helpers ----------------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int = 1, warmup: int = 0) -> tuple[float, object]:
    """(median seconds of `reps` calls, the last result), after `warmup` calls; device-synchronised."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def event_time(fn, device, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean seconds per call of `calls` back-to-back calls
    (`fn(i)` gets the call index, to rotate buffers); CUDA events on a GPU."""
    fn(0)
    sync(device)
    cuda = torch.device(device).type == "cuda"
    per = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(calls):
                fn(i)
            b.record()
            b.synchronize()
            per.append(a.elapsed_time(b) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            per.append((time.perf_counter() - t0) / calls)
    return statistics.median(per)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def env_info(device) -> dict:
    from rome_fast import backend_info
    device = torch.device(device)
    info = dict(torch=torch.__version__, torch_cuda=torch.version.cuda, device=str(device),
                python=sys.version.split()[0], threads=torch.get_num_threads(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                backend=backend_info())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, capability=list(torch.cuda.get_device_capability(device)),
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        import platform
        info.update(device_name=platform.processor() or platform.machine())
    return info


def target(name: str, measured, **figures) -> dict:
    """One target entry: the measured figure against TARGETS[name], met / missed / not measured."""
    label, op, value, unit = TARGETS[name]
    ok = measured is not None and isinstance(measured, (int, float)) and math.isfinite(measured)
    met = (measured >= value if op == ">=" else measured <= value) if ok else None
    status = "not measured" if met is None else ("met" if met else "missed")
    return dict(name=name, label=label, measured=measured if ok else None, op=op, target=value, unit=unit,
                met=met, status=status, **figures)


def build_model(model: str, quick: bool, device, dtype=torch.float32):
    from rome_fast.models import ModelAndTokenizer
    from rome_fast.models.random_init import random_model
    family = MODELS[model]
    m, tok = random_model(family, size="tiny" if quick else model, seed=0, dtype=dtype, device=device)
    return ModelAndTokenizer(model=m, tokenizer=tok), family


def profile_call(fn, device, top: int = 15) -> dict:
    """torch.profiler summary of one call: wall time, device busy time, kernel launches, memory
    copies, and the top ops (by device time on a GPU, CPU time otherwise) with their call counts."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()

    def dev_self(e):  # microseconds
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    def dev_total(e):
        return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)

    on_device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    on_host = [e for e in events if e not in on_device]
    launches = sum(e.count for e in on_host if "LaunchKernel" in e.key)
    copies = [e for e in on_device if "memcpy" in e.key.lower()]
    busy = sum(dev_self(e) for e in on_device) / 1e3

    def row(e):
        return dict(name=e.key[:90], calls=e.count, self_device_ms=round(dev_self(e) / 1e3, 3),
                    device_total_ms=round(dev_total(e) / 1e3, 3),
                    self_cpu_ms=round(e.self_cpu_time_total / 1e3, 3), cpu_total_ms=round(e.cpu_time_total / 1e3, 3))

    key = dev_total if cuda else (lambda e: e.self_cpu_time_total)
    ops = sorted((e for e in on_host if e.key.startswith("aten::") or "rome_fast" in e.key), key=key, reverse=True)
    return dict(wall_ms=round(wall * 1e3, 3), device_busy_ms=round(busy, 3) if cuda else None,
                device_idle_ms=round(wall * 1e3 - busy, 3) if cuda else None,
                kernel_launches=launches, kernels=sum(e.count for e in on_device),
                memcpy_calls=sum(e.count for e in copies), memcpy_ms=round(sum(dev_self(e) for e in copies) / 1e3, 3),
                top_ops=[row(e) for e in ops[:top]],
                top_kernels=[row(e) for e in sorted(on_device, key=dev_self, reverse=True)[:top]])


def want_profile(args, targets: list) -> bool:
    return args.profile == "always" or (args.profile == "auto" and any(t["met"] is False for t in targets))


# ---- trace ------------------------------------------------------------------------------------
def step_trace(args, model: str, plan: dict, device) -> dict:
    import trace_side_by_side as tsb
    mt, family = build_model(model, args.quick, device)
    size = "tiny" if args.quick else model
    raw_out = Path(args.parts) / f"trace_raw_{model}.json"
    argv = ["--random", size, "--family", family, "--facts", str(plan["facts"]),
            "--reference-facts", str(plan["reference_facts"]), "--kinds", plan["kinds"],
            "--dtypes", plan["dtypes"], "--device", str(device), "--matmul-n", str(plan["matmul_n"]),
            "--out", str(raw_out)] + (["--together-only"] if plan.get("together_only") else [])
    report = tsb.main(argv, mt=mt)
    n_ref = report["reference_facts"]
    rows, targets, by_dtype = [], [], {}
    for run in report["runs"]:
        all_row = next(r for r in run["rows"] if r["kind"] == "all")
        by_dtype[run["dtype"]] = all_row
        kinds = "+".join(report["kinds"])
        rows.append(dict(label=f"trace {kinds}, {run['dtype']}, s/fact", reference=all_row["ref_s_per_fact"],
                         fast=all_row["fast_s_per_fact"], unit="s", ratio=all_row["ratio"],
                         max_abs_dscore=all_row["max_abs_dscore_vs_reference"],
                         note=f"reference (fp32) on {n_ref} of {report['facts']} facts"))
        minutes = all_row["fast_s_per_fact"] * FACTS_FOR_EXTRAPOLATION / 60
        rows.append(dict(label=f"trace {FACTS_FOR_EXTRAPOLATION} facts x {kinds}, {run['dtype']} (extrapolated)",
                         reference=all_row["ref_s_per_fact"] * FACTS_FOR_EXTRAPOLATION / 60,
                         fast=minutes, unit="min", ratio=all_row["ratio"]))
        rows.append(dict(label=f"roofline: engine TFLOP/s, {run['dtype']}", reference=run["matmul_tflops"],
                         fast=run["achieved_tflops"], unit="TFLOP/s",
                         ratio=run["achieved_tflops"] / run["matmul_tflops"] if run["matmul_tflops"] else None,
                         note=f"reference column: a {plan['matmul_n']}^3 matmul on this device; "
                              f"{run['engine_flop_per_fact'] / 1e12:.3f} TFLOP per fact (FlopCounterMode)"))
    if model == TARGET_MODEL and report["kinds"] == ["hidden", "mlp", "attn"]:
        f32, b16 = by_dtype.get("float32"), by_dtype.get("bfloat16")
        targets += [
            target("trace_fp32_speedup", f32 and f32["ratio"], reference=f32 and f32["ref_s_per_fact"],
                   fast=f32 and f32["fast_s_per_fact"], figure_unit="s/fact"),
            target("trace_bf16_speedup", b16 and b16["ratio"], reference=b16 and b16["ref_s_per_fact"],
                   fast=b16 and b16["fast_s_per_fact"], figure_unit="s/fact"),
            target("trace_1209x3_bf16_minutes", b16 and b16["fast_s_per_fact"] * FACTS_FOR_EXTRAPOLATION / 60),
            target("trace_fp32_max_dscore", f32 and f32["max_abs_dscore_vs_reference"]),
        ]
    part = dict(rows=rows, targets=targets, raw=report)
    if want_profile(args, targets):
        missed_bf16 = any(t["met"] is False and "bf16" in t["name"] for t in targets)
        dname = "bfloat16" if (missed_bf16 or not targets) and "bfloat16" in plan["dtypes"] else "float32"
        part["profile"] = dict(call=f"TraceEngine.trace, 1 fact, kinds {plan['kinds']}, {dname}",
                               **_profile_trace(mt, tsb, plan, dname, device))
    return part


def _profile_trace(mt, tsb, plan, dname, device) -> dict:
    from rome_fast.trace.engine import FactInput, TraceEngine
    from rome_fast.trace.noise import draw_noise
    kinds = tsb.KINDS if plan["kinds"] == "all" else tuple(plan["kinds"].split(","))
    (ids, rng, noise), = tsb._random_facts(mt, SimpleNamespace(facts=1))
    mt.model.to(tsb.DTYPES[dname])
    try:
        engine = TraceEngine(mt)
        fact = [FactInput(ids, rng, draw_noise(10, rng[1] - rng[0], mt.adapter.hidden_size, noise))]
        engine.trace(fact, kinds=kinds)  # warm-up
        return profile_call(lambda: engine.trace(fact, kinds=kinds), device)
    finally:
        mt.model.to(torch.float32)


# ---- edit -------------------------------------------------------------------------------------
REQUESTS = [  # token ids from the tiny tokenizer: every word is in its training text
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": " football"}},
    {"prompt": "{} is located in the city of", "subject": "The Space Needle", "target_new": {"str": " Rome"}},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": " Japan"}},
    {"prompt": "{} is headquartered in", "subject": "Toyota", "target_new": {"str": " Paris"}},
    {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": {"str": " basketball"}},
]


def random_spd(d: int, device, seed: int = 0) -> torch.Tensor:
    """A random symmetric positive definite d×d matrix (fp64): G Gᵀ/d + 10⁻²·I, G Gaussian."""
    g = torch.Generator(device=device).manual_seed(seed)
    G = torch.randn(d, d, generator=g, device=device, dtype=torch.float32)
    C = (G @ G.T).double().div_(d)
    C = (C + C.T) / 2
    C.diagonal().add_(1e-2)
    return C


def context_templates(quick: bool) -> list[str]:
    """["{}"] + 10 short and 10 longer word sequences, each + ". {}" (the reference's template
    shapes [[5, 10], [10, 10]]; given, so neither path samples from the random model)."""
    from rome_fast.models.random_init import random_texts
    short, long_ = random_texts(10, 11, (4, 4)), random_texts(10, 12, (9, 9))
    return ["{}"] + [t + ". {}" for t in short + long_][: (4 if quick else 20)]


def write_random_stats(model, hp, stats_dir: Path, device) -> dict:
    """A random SPD second moment for each edited layer, written where both backends look for
    the layer's statistics file (10·d_k keys, so it passes the editing checks)."""
    from rome_fast.edit.sites import edit_sites
    from rome_fast.edit.stats import SecondMoment, context_length, save_stats_file, stats_model_name, stats_path
    out = {}
    ctx = context_length(model)
    for site in edit_sites(model, hp):
        count = 10 * site.key_size
        C = random_spd(site.key_size, device, seed=site.layer)
        path = stats_path(stats_dir, stats_model_name(model), hp.mom2_dataset, site.rewrite, hp.mom2_dtype,
                          ("mom2",), hp.mom2_n_samples, 3 * ctx, ctx)
        save_stats_file(path, SecondMoment((C * count).float().cpu(), count), hp.mom2_n_samples)
        out[site.layer] = dict(key_size=site.key_size, file=path.name)
    return out


def step_edit(args, model: str, plan: dict, device) -> dict:
    import dataclasses

    from rome_fast.edit import ROMEHyperParams, apply_rome_to_model, restore_weights
    from rome_fast.edit.compute_u import clear_cache as clear_inverse_cache
    from rome_fast.edit.sites import edit_sites
    from rome_fast.edit.solve_update import clear_factor_cache
    mt, _ = build_model(model, args.quick, device)
    if model == "gpt2-xl" and not args.quick:
        hp = ROMEHyperParams.from_name("gpt2-xl")
    else:
        hp = ROMEHyperParams.for_model(mt.model, layer=plan["layer"])
    hp = dataclasses.replace(hp, mom2_dataset="random",
                             **({"v_num_grad_steps": plan["v_steps"]} if plan["v_steps"] else {}))
    templates = context_templates(args.quick)
    stats_dir = Path(tempfile.mkdtemp(prefix="rome-gpu-stats-"))
    stats = write_random_stats(mt.model, hp, stats_dir, device)
    kw = dict(context_templates=templates, stats_dir=stats_dir, progress=False)
    W0 = {s.weight: mt.model.get_parameter(s.weight).detach().clone() for s in edit_sites(mt.model, hp)}

    def edit(backend, req):
        _, orig = apply_rome_to_model(mt.model, mt.tokenizer, [req], hp, return_orig_weights=True,
                                      backend=backend, **kw)
        upd = {n: mt.model.get_parameter(n).detach() - w for n, w in orig.items()}
        restore_weights(mt.model, orig)
        return upd

    clear_inverse_cache(), clear_factor_cache()
    first = {b: timed(lambda b=b: edit(b, REQUESTS[0]), device)[0] for b in ("reference", "fast")}
    per = {"reference": [], "fast": []}
    diffs = []
    for req in REQUESTS[1:1 + plan["edits"]]:
        t_r, u_r = timed(lambda: edit("reference", req), device)
        t_f, u_f = timed(lambda: edit("fast", req), device)
        per["reference"].append(t_r)
        per["fast"].append(t_f)
        diffs.append(max(rel(u_f[n], u_r[n]) for n in u_r))
    for n, w in W0.items():
        assert torch.equal(mt.model.get_parameter(n), w), f"{n} not restored"
    ref_s, fast_s = statistics.mean(per["reference"]), statistics.mean(per["fast"])
    where = f"layers {hp.layers}, {hp.v_num_grad_steps} value steps, {len(templates)} templates"
    rows = [dict(label="ROME edit, s/edit (statistics and C^-1 / factor cached)", reference=ref_s, fast=fast_s,
                 unit="s", ratio=ref_s / fast_s, max_rel_diff_update=max(diffs), note=where),
            dict(label="first ROME edit of a layer (loads statistics, inverse / factor)",
                 reference=first["reference"], fast=first["fast"], unit="s",
                 ratio=first["reference"] / first["fast"])]
    targets = []
    if model == TARGET_MODEL:
        targets = [target("edit_speedup", ref_s / fast_s, reference=ref_s, fast=fast_s, figure_unit="s/edit"),
                   target("edit_max_rel_diff", max(diffs))]
    part = dict(rows=rows, targets=targets,
                raw=dict(per_edit=per, max_rel_diff_update=diffs, first_edit_s=first, statistics=stats,
                         hparams=hp.to_dict(), templates=len(templates)))
    if want_profile(args, targets):
        part["profile"] = dict(call="one fast ROME edit (apply and restore)",
                               **profile_call(lambda: edit("fast", REQUESTS[1]), device))
    return part


# ---- update -----------------------------------------------------------------------------------
def update_shape(shape: str) -> tuple[int, int, str]:
    """(d_k, d_v, layout) of the rewrite weight (the MLP output projection) of a model shape."""
    from rome_fast.models.random_init import SHAPES
    s = SHAPES[shape]
    return s["inner"], s["d"], ("in_out" if shape.startswith("gpt2") or shape == "tiny" else "out_in")


def step_update(args, model, plan: dict, device) -> dict:
    from rome_fast.edit.solve_update import CovarianceFactor, rank_k_update_, rank_k_update_ref, rome_update_, \
        rome_update_ref
    device = torch.device(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    rows, targets, raw = [], [], []
    for shape in plan["shapes"]:
        d_k, d_v, layout = update_shape(shape)
        C = random_spd(d_k, device)
        factor = CovarianceFactor(C, device=device)
        C_inv = torch.inverse(C.float())
        g = torch.Generator(device=device).manual_seed(1)
        kbar = torch.rand(d_k, generator=g, device=device)
        kstar = kbar + 0.1 * torch.randn(d_k, generator=g, device=device)
        resid = torch.randn(d_v, generator=g, device=device)
        u = torch.randn(d_k, generator=g, device=device)
        r = torch.randn(d_v, generator=g, device=device)
        for dtype in (torch.float32, torch.bfloat16):
            wshape = (d_k, d_v) if layout == "in_out" else (d_v, d_k)
            nbytes = d_k * d_v * torch.finfo(dtype).bits // 8
            nbuf = max(2, math.ceil(4 * l2 / nbytes)) if l2 else 2  # spill the L2: DRAM, not cache
            Ws = [torch.randn(wshape, generator=g, device=device).to(dtype) for _ in range(nbuf)]
            dst = [torch.empty_like(W) for W in Ws]
            # correctness first: the compiled kernel against the reference arithmetic
            a, b = Ws[0].clone(), Ws[0].clone()
            rank_k_update_(a, u, r, layout)
            rank_k_update_ref(b, u, r, layout)
            kernel_rel = rel(a.float() - Ws[0].float(), b.float() - Ws[0].float())
            calls = 2 * nbuf
            t_copy = event_time(lambda i: dst[i % nbuf].copy_(Ws[i % nbuf]), device, calls)
            t_k = event_time(lambda i: rank_k_update_(Ws[i % nbuf], u, r, layout), device, calls)
            t_kref = event_time(lambda i: rank_k_update_ref(Ws[i % nbuf], u, r, layout), device, calls)
            t_fused = event_time(lambda i: rome_update_(Ws[i % nbuf], factor, kbar, kstar, resid, layout),
                                 device, calls)
            t_ref = event_time(lambda i: rome_update_ref(Ws[i % nbuf], None, kbar, kstar, resid, layout, C_inv=C_inv),
                               device, calls)
            copy_gbs, k_gbs = 2 * nbytes / t_copy / 1e9, 2 * nbytes / t_k / 1e9
            # the fused call's floor: W read and written once + the fp64 triangle read twice
            fused_bytes = 2 * nbytes + 2 * (d_k * (d_k + 1) // 2) * 8
            dname = str(dtype).removeprefix("torch.")
            rec = dict(shape=shape, W=list(wshape), layout=layout, dtype=dname, buffers=nbuf,
                       copy_s=t_copy, copy_GBps=copy_gbs, rank1_s=t_k, rank1_GBps=k_gbs,
                       rank1_copy_fraction=k_gbs / copy_gbs, rank1_reference_s=t_kref,
                       rank1_rel_diff_vs_reference=kernel_rel, rome_update_s=t_fused,
                       rome_update_floor_fraction=fused_bytes / copy_gbs / 1e9 / t_fused,
                       reference_update_cached_inverse_s=t_ref)
            raw.append(rec)
            tag = f"{shape} {wshape[0]}x{wshape[1]} {dname}"
            rows += [dict(label=f"W += u r^T, {tag}, GB/s (reference: copy of W)", reference=copy_gbs, fast=k_gbs,
                          unit="GB/s", ratio=k_gbs / copy_gbs, note=f"{nbuf} buffers rotated"),
                     dict(label=f"W += u r^T, {tag}, ms", reference=t_kref * 1e3, fast=t_k * 1e3, unit="ms",
                          ratio=t_kref / t_k, note="reference: materialised outer product + add"),
                     dict(label=f"one edit's update (factor / C^-1 cached), {tag}, ms", reference=t_ref * 1e3,
                          fast=t_fused * 1e3, unit="ms", ratio=t_ref / t_fused,
                          note=f"fused at {rec['rome_update_floor_fraction']:.0%} of its copy-bandwidth floor "
                               "(W once + the fp64 triangle twice)")]
            if shape == plan["target_shape"]:
                name = "update_fp32_copy_fraction" if dtype == torch.float32 else "update_bf16_copy_fraction"
                targets.append(target(name, k_gbs / copy_gbs, reference=copy_gbs, fast=k_gbs, figure_unit="GB/s"))
            del Ws, dst
    part = dict(rows=rows, targets=targets, raw=raw)
    if want_profile(args, targets):
        d_k, d_v, layout = update_shape(plan["shapes"][0])
        W = torch.randn((d_k, d_v) if layout == "in_out" else (d_v, d_k), device=device)
        u, r = torch.randn(d_k, device=device), torch.randn(d_v, device=device)
        part["profile"] = dict(call=f"rank_k_update_ on {plan['shapes'][0]}, fp32, 10 calls",
                               **profile_call(lambda: [rank_k_update_(W, u, r, layout) for _ in range(10)], device))
    return part


# ---- statistics -------------------------------------------------------------------------------
def step_stats(args, model: str, plan: dict, device) -> dict:
    from rome_fast.edit import ROMEHyperParams
    from rome_fast.edit.fast_stats import collect_mom2_fast
    from rome_fast.edit.stats import collect_mom2, context_length
    from rome_fast.models.random_init import random_texts
    mt, _ = build_model(model, args.quick, device)
    if model == "gpt2-xl" and not args.quick:
        layer = ROMEHyperParams.from_name("gpt2-xl").layers[0]
    else:
        layer = 1 if args.quick else 5
    name = mt.adapter.rewrite_name(layer)
    texts = random_texts(plan["texts"], 5, tuple(plan["words"]))
    maxlen = context_length(mt.model)
    m, tok = mt.model, mt.tokenizer
    runs = {"reference fp32": lambda t: collect_mom2(m, tok, [name], t, maxlen, 3 * maxlen, progress=False),
            "fast fp32": lambda t: collect_mom2_fast(m, tok, [name], t, maxlen, 3 * maxlen, progress=False),
            "fast bf16": lambda t: collect_mom2_fast(m, tok, [name], t, maxlen, 3 * maxlen, act_dtype="bfloat16",
                                                     progress=False)}
    out, secs = {}, {}
    for key, fn in runs.items():
        fn(texts[:4])  # warm-up: kernels, allocator
        secs[key], out[key] = timed(lambda fn=fn: fn(texts), device)
    n = out["reference fp32"][name].count
    ref_m = out["reference fp32"][name].mom2
    rows, tok_s = [], {k: n / s for k, s in secs.items()}
    for key in ("fast fp32", "fast bf16"):
        assert out[key][name].count == n, (key, out[key][name].count, n)
        rows.append(dict(label=f"statistics, {key.split()[1]} forward, tokens/s (1 layer: {name})",
                         reference=tok_s["reference fp32"], fast=tok_s[key], unit="tokens/s",
                         ratio=secs["reference fp32"] / secs[key], rel_diff_mom2=rel(out[key][name].mom2, ref_m),
                         note=f"{len(texts)} random texts, {n} tokens, truncated at {maxlen}"))
    targets = []
    if model == TARGET_MODEL:
        targets = [target("stats_bf16_speedup", secs["reference fp32"] / secs["fast bf16"],
                          reference=tok_s["reference fp32"], fast=tok_s["fast bf16"], figure_unit="tokens/s")]
    part = dict(rows=rows, targets=targets, raw=dict(seconds=secs, tokens=n, texts=len(texts), layer=name))
    if want_profile(args, targets):
        part["profile"] = dict(call="fast collector, bf16 forward, 8 texts",
                               **profile_call(lambda: runs["fast bf16"](texts[:8]), device))
    return part


STEPS = {"trace": step_trace, "edit": step_edit, "update": step_update, "stats": step_stats}


def part_path(parts, step: str, model) -> Path:
    return Path(parts) / (f"{step}_{model}.json" if model else f"{step}.json")


def run_step(args, spec: str) -> bool:
    """Runs one STEP[:MODEL] and writes its part (with the error, if it failed)."""
    step, _, model = spec.partition(":")
    model = model or (None if step == "update" else TARGET_MODEL)
    plan = (QUICK if args.quick else PLAN)[(step, model)]
    for key in ("facts", "reference_facts", "edits"):
        if getattr(args, key) is not None and key in plan:
            plan = dict(plan, **{key: getattr(args, key)})
    device = torch.device(args.device)
    part = dict(step=step, model=model, quick=args.quick, plan=plan)
    t0 = time.perf_counter()
    print(f"--- {spec} ({'quick, ' if args.quick else ''}{device})", flush=True)
    try:
        part["env"] = env_info(device)
        part.update(STEPS[step](args, model, plan, device))
        ok = True
    except Exception as exc:  # noqa: BLE001 - recorded in the part; the suite goes on
        traceback.print_exc()
        part["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        part["traceback"] = traceback.format_exc()[-4000:]
        ok = False
    part["seconds"] = time.perf_counter() - t0
    path = part_path(args.parts, step, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(part, indent=1, default=str) + "\n")
    for t in part.get("targets", []):
        print(f"    {t['status']:>12}: {t['label']} = {t['measured']} (target {t['op']} {t['target']})", flush=True)
    print(f"--- {spec}: {'ok' if ok else 'FAILED: ' + part['error']} in {part['seconds']:.1f} s", flush=True)
    return ok


# ---- merge ------------------------------------------------------------------------------------
def junit_summary(path: Path) -> dict:
    """Counts and failed tests of a pytest junit XML file (written by this suite's test step)."""
    import xml.etree.ElementTree as ET
    if not path.is_file():
        return dict(ran=False, note=f"no {path.name}: the test step did not run or did not finish")
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                               message=(bad.get("message") or "")[:500]))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(ran=True, **counts, failed=failed[:50])


def merge(parts: Path, out: Path, mode: str) -> dict:
    """One results file from the parts, the suite's step log and the test summary."""
    def load(p: Path):
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            return dict(error=f"unreadable {p.name}: {exc}")

    steps = []
    log = parts / "steps.jsonl"
    if log.is_file():
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    order = ["trace_gpt2-xl", "edit_gpt2-xl", "update", "stats_gpt2-xl", "trace_llama-7b"]
    found = sorted((p for p in parts.glob("*.json") if not p.name.startswith(("trace_raw_", "memit", "env"))),
                   key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))
    benches = {p.stem: load(p) for p in found}
    env = next((b["env"] for b in benches.values() if "env" in b), None)
    if (parts / "env.json").is_file():
        env = dict(env or {}, **load(parts / "env.json"))
    by_name = {t["name"]: t for b in benches.values() for t in b.get("targets", [])}
    targets = [by_name.get(name) or target(name, None) for name in TARGETS]
    memit = {p.stem: load(p) for p in sorted(parts.glob("memit*.json"))}
    res = dict(
        suite=dict(mode=mode, written=time.strftime("%Y-%m-%d %H:%M:%S"),
                   total_s=sum(s.get("seconds", 0) for s in steps),
                   note=("CPU quick mode: tiny models on the CPU, checking the suite's plumbing; the targets "
                         "are the H200's and mean nothing here" if mode == "cpu-quick" else
                         "random-weight models of real sizes; targets for the GPT-2 XL shape")),
        env=env, steps=steps, tests=junit_summary(parts / "pytest_cuda.xml"),
        targets=targets,
        summary=dict(met=sum(t["status"] == "met" for t in targets),
                     missed=sum(t["status"] == "missed" for t in targets),
                     not_measured=sum(t["status"] == "not measured" for t in targets)),
        benchmarks={k: {kk: vv for kk, vv in v.items() if kk != "env"} for k, v in benches.items()},
        memit=memit or dict(skipped="benchmarks/memit_gpu.py did not run or wrote nothing"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    tmp.replace(out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", nargs="+", help="STEP[:MODEL] ... (trace, edit, update, stats), or merge")
    ap.add_argument("--parts", required=True, help="folder for the per-step results")
    ap.add_argument("--quick", action="store_true", help="tiny models (CPU quick mode)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="torch.profiler summary of one call: where a target is missed (auto), always, never")
    ap.add_argument("--facts", type=int, default=None, help="override the plan's facts (trace)")
    ap.add_argument("--reference-facts", type=int, default=None, help="override (trace)")
    ap.add_argument("--edits", type=int, default=None, help="override the timed edits (edit)")
    ap.add_argument("--out", default=None, help="merge: the results file")
    ap.add_argument("--mode", default="gpu", help="merge: gpu or cpu-quick")
    args = ap.parse_args(argv)
    if args.steps == ["merge"]:
        if not args.out:
            ap.error("merge needs --out")
        res = merge(Path(args.parts), Path(args.out), args.mode)
        print(f"merged {len(res['benchmarks'])} parts: targets met {res['summary']['met']}, missed "
              f"{res['summary']['missed']}, not measured {res['summary']['not_measured']} -> {args.out}")
        return 0
    for spec in args.steps:
        step, _, model = spec.partition(":")
        if step not in STEPS or (model and model not in MODELS) or (step == "update" and model):
            ap.error(f"unknown step {spec!r}: one of trace, edit, stats (optionally :gpt2-xl or :llama-7b), update")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # strict fp32, as the reference runs: TF32 off everywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = [run_step(args, spec) for spec in args.steps]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
