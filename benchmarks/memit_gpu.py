"""MEMIT on a random GPT-J-shaped model (GPU suite entry point): N edits at once, fast backend
(and, with --reference, the reference path for the smallest N), timed by phase.

    python benchmarks/memit_gpu.py --edits 100 1000 [--reference] [--out results.json]
    python benchmarks/memit_gpu.py --quick            # a tiny GPT-J on the CPU (what the tests run)

The weights are random (a forward pass costs the same whatever their values) and so is each edited
layer's second moment C (a random symmetric positive definite matrix, C = GGᵀ/d_k + 10⁻²·I), given
to the edit as `cov` (nothing is collected or read). Requests are synthetic, with distinct
(subject, prompt) pairs. Timed per call: setup (C's fp64 Cholesky factor per layer), the z step and
the layer updates (keys, solve, fused update). The hyperparameters are the GPT-J preset's (layers
3-8, 25 steps, λ 15000)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["{} is located in the city of", "{} plays the sport of", "The mother tongue of {} is",
           "{} is headquartered in", "{} was founded by", "{}, which is located in the continent of"]
TARGETS = [" Rome", " football", " English", " Germany", " Paris", " Japan", " Egypt", " trumpet"]


def synthetic_requests(n: int) -> list[dict]:
    """n requests with distinct (subject, prompt) pairs, from the tiny tokenizer's words."""
    from rome_fast.models.random_init import _CORPUS
    words = sorted({w.strip(".,;") for w in _CORPUS.split() if w[:1].isupper() and len(w) > 3})
    out = []
    for i in range(n):
        a, b = words[i % len(words)], words[(i // len(words)) % len(words)]
        out.append({"prompt": PROMPTS[i % len(PROMPTS)], "subject": f"{a} {b} {i // len(PROMPTS)}",
                    "target_new": {"str": TARGETS[i % len(TARGETS)]}})
    return out


def random_covs(model, hp, device, seed: int = 0) -> dict:
    from rome_fast.edit.sites import edit_sites
    g = torch.Generator(device=device).manual_seed(seed)
    covs = {}
    for site in edit_sites(model, hp):
        layer, d = site.layer, site.key_size
        G = torch.randn(d, d, generator=g, device=device)
        covs[layer] = (G @ G.T).div_(d).add_(torch.eye(d, device=device), alpha=1e-2)
        del G
    return covs


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--reference", action="store_true", help="also time the reference path (smallest N)")
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-J on the CPU, N = 8 and 16, with the reference")
    ap.add_argument("--device", default=None, help="default: cuda when available (--quick: cpu)")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    args = ap.parse_args(argv)

    import dataclasses

    from rome_fast.edit import restore_weights
    from rome_fast.edit.memit import MEMITHyperParams, apply_memit_to_model
    from rome_fast.models.random_init import random_model

    if args.quick:
        device, edits, reference = args.device or "cpu", [8, 16], True
        model, tok = random_model("gptj", size="tiny", seed=0, device=device)
        hp = dataclasses.replace(MEMITHyperParams.for_model(model, layers=[1, 2]), v_num_grad_steps=5)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        edits, reference = sorted(args.edits), args.reference
        model, tok = random_model("gptj", size="gpt-j-6b", seed=0, device=device)
        hp = MEMITHyperParams.from_name("EleutherAI/gpt-j-6B")
    covs = random_covs(model, hp, device)
    res = {"model": "random GPT-J-shaped" + (" (tiny)" if args.quick else ""), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "layers": hp.layers, "v_num_grad_steps": hp.v_num_grad_steps, "rows": []}
    for i, n in enumerate(edits):
        reqs = synthetic_requests(n)
        for backend in (["fast", "reference"] if reference and i == 0 else ["fast"]):
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            info = {}
            _sync(device)
            t0 = time.perf_counter()
            _, orig = apply_memit_to_model(model, tok, reqs, hp, return_orig_weights=True, backend=backend, cov=covs,
                                           progress=False, return_info=info)
            _sync(device)
            wall = time.perf_counter() - t0
            upd = {k: (model.get_parameter(k) - w).detach() for k, w in orig.items()}
            restore_weights(model, orig)
            row = {"edits": n, "backend": backend, "seconds": dict(info["seconds"], total=wall),
                   "z_steps_mean": sum(z.steps for z in info["z"]) / n,
                   "peak_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                if torch.device(device).type == "cuda" else None)}
            if backend == "reference":
                fast = res["_fast_upd"]
                row["rel_diff_update_max"] = max(float((fast[k] - u).norm() / u.norm()) for k, u in upd.items())
                row["speedup"] = wall / res["rows"][-1]["seconds"]["total"]
            res["_fast_upd"] = upd
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    res.pop("_fast_upd", None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
