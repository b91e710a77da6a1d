"""`rome-fast demo`: causal tracing of one well-known fact on the embedded model, with a short
explanation of what the heat maps say."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .arguments import positive_int
from .data import bundled
from .models.loading import load_model_spec
from .trace.api import BACKENDS, DEFAULT_BACKEND, calculate_hidden_flow
from .trace.kinds import KINDS, get_kind, kind_names
from .trace.noise import collect_embedding_std
from .trace.plots import plot_trace_heatmap
from .trace.results import TraceResult
from .trace.runner import load_facts
from .trace.summary import best_cells, layer_band, summarize_trace

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_SUBJECT = "Eiffel Tower"
DEFAULT_OUT = "rome_fast_out/demo"

# A few well-known subjects of the same kind as known_1000's (tests use them for a quick σ).
BUILTIN_SUBJECTS = (
    "Vinson Massif", "Beats Music", "Audible.com", "Catalonia", "Michael Jordan", "Danielle Darrieux",
    "Toyota", "Apple", "Miles Davis", "Lionel Messi", "Mount Everest", "The Louvre", "Colosseum",
    "Space Needle", "Nile", "Brazil", "Berlin", "Madrid", "Steve Jobs", "Google", "Microsoft",
    "Nintendo", "BBC", "Pablo Picasso", "Albert Einstein", "Amazon River", "Kenya", "Honda Civic",
    "Windows 10", "Sydney Opera House", "Volkswagen", "Mozart",
)


def noise_subjects(data: str | None = None) -> tuple[list[str], str]:
    """(subjects for σ, a sentence saying where they came from): those of the known-facts file
    `data`, by default known_1000.json as shipped with the package."""
    path = Path(data) if data else bundled("known_1000.json")
    facts = load_facts(path)
    return [f["subject"] for f in facts], f"the {len(facts)} subjects of {path}"


def interpret(results: dict, n_layers: int) -> list[str]:
    """What the traces suggest, in the paper's terms (only claims the numbers support)."""
    out = []
    for kind, r in results.items():
        if not r.correct_prediction:
            continue
        c = best_cells(r)
        st, sl, _, sfrac = c["subject"]
        lt, ll, _, lfrac = c["last"]
        if sfrac is None:  # the noise did not lower p(answer): summarize_trace says so
            continue
        tok = r.input_tokens[st]
        if kind == "hidden":
            out.append(f"- Hidden states: restoring one vector, at the subject token {tok!r} in {layer_band(sl, n_layers)} "
                       f"layers, brings back {sfrac:.0%} of the drop: the fact is recalled while the subject "
                       "is read.")
            if c["last_half_from"] is not None:
                out.append(f"  At the last token, restoring works from layer {c['last_half_from']} on: by then "
                           "the answer has been moved there.")
        elif kind == "mlp":
            verdict = ("the paper's 'decisive MLP' site, where ROME writes its edit" if sfrac >= lfrac
                       else "here the MLPs matter more at the last token than at the subject")
            out.append(f"- MLPs: a window centred at layer {sl} at {tok!r} brings back {sfrac:.0%} "
                       f"(last token: {lfrac:.0%}): {verdict}.")
        elif kind == "attn":
            verdict = ("attention carries the recalled fact from the subject to the position that predicts"
                       if lfrac >= sfrac else "here attention matters more at the subject")
            out.append(f"- Attention: a window centred at layer {ll} at the last token brings back {lfrac:.0%} "
                       f"(subject: {sfrac:.0%}): {verdict}.")
    return out


def run_demo(args) -> int:
    import torch

    kinds = kind_names(args.kind)
    if args.stats_samples is not None and args.stats_samples < 1:
        raise ValueError(f"--stats-samples must be at least 1, got {args.stats_samples}")
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    mt = load_model_spec(args.model)
    print(f"model: {mt.name} ({mt.num_layers} layers), loaded in {time.time() - t0:.1f} s; "
          f"{torch.get_num_threads()} CPU threads, backend {args.backend}")
    subjects, source = noise_subjects(args.data)
    sigma = collect_embedding_std(mt, subjects)
    noise = 3 * sigma
    print(f"noise: Gaussian, std 3σ = {noise:.4f}, σ = {sigma:.4f} from {source}")
    print(f"prompt: {DEMO_PROMPT!r}, subject {DEMO_SUBJECT!r}")
    results = {}
    for kind in kinds:
        t1 = time.time()
        res = calculate_hidden_flow(mt, DEMO_PROMPT, DEMO_SUBJECT, samples=args.samples, noise=noise,
                                    kind=kind, backend=args.backend)
        r = TraceResult.from_dict(res)
        stem = out / f"eiffel_tower{get_kind(kind).suffix}"
        r.save(stem.with_suffix(".npz"))
        plot_trace_heatmap(r, savepdf=stem.with_suffix(".pdf"), modelname=mt.name)
        results[kind] = r
        print(f"traced {kind}: {r.scores.shape[0]} tokens × {r.scores.shape[1]} layers in {time.time() - t1:.1f} s")
    first = next(iter(results.values()))
    print()
    print(f"Clean run: the model predicts {first.answer!r} with p = {first.high_score:.3f}.")
    print(f"Corrupted run (noise on the subject's embeddings): p({first.answer.strip()}) = {first.low_score:.3f}.")
    print("Restoring one clean state into the corrupted run (p of the clean answer; "
          "'drop' = clean − corrupted):")
    for kind, r in results.items():
        for line in summarize_trace(r, kind, mt.num_layers):
            print("  " + line)
    print("\nWhat this suggests:")
    for line in interpret(results, mt.num_layers):
        print(line)
    summary = {k: dict(answer=r.answer, high_score=r.high_score, low_score=r.low_score,
                       peak=dict(zip(("token", "layer", "score"), r.peak())))
               for k, r in results.items()}
    summary["noise"] = dict(std=noise, sigma=sigma, sigma_source=source)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nheat maps and results in {out}/ (eiffel_tower*.png / .pdf / .npz); trace {time.time() - t0:.0f} s")
    if not args.no_edit:
        _edit_step(mt, out, args.corpus, args.stats_samples)
    from .report import write_report
    print(f"\nreport (open it in a browser): {write_report(out)}")
    return 0


def _edit_step(mt, out: Path, corpus, stats_samples=None) -> None:
    """ROME at the site the trace found: the Eiffel Tower moved to Rome, before/after completions,
    then the original weights back. Key statistics are computed once (a few minutes) and cached."""
    from .edit.demo import run_edit_demo
    print("\nEditing the fact with ROME: 'The Eiffel Tower is located in the city of' -> ' Rome'")
    run_edit_demo(mt, out=out / "edit.json", corpus=corpus, sample_size=stats_samples)


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="trace 'The Eiffel Tower is located in the city of' on the embedded model",
                       description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--kind", default="all", choices=["all", *KINDS],
                   help="which states to restore (default all; one kind is that many times faster)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS))
    p.add_argument("--samples", type=positive_int, default=10, help="corrupted runs per pass (default 10)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (on a busy machine 1 can be much faster)")
    p.add_argument("--data", help="known-facts JSON whose subjects give σ (default: known_1000.json, "
                                  "shipped with the package)")
    p.add_argument("--no-edit", action="store_true", help="trace only, skip the ROME edit step")
    p.add_argument("--corpus", help="text file for the edit's key statistics (default: WikiText-2, "
                                    "shipped with the package; $ROME_FAST_CORPUS overrides)")
    p.add_argument("--stats-samples", type=int, help="texts of the corpus for the key statistics "
                   "(default: the preset's 100000, i.e. all of WikiText-2; fewer is faster and cruder)")
    p.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    p.set_defaults(func=run_demo)
