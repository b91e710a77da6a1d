"""`rome-fast stats` and `rome-fast edit` (ROME: one fact; MEMIT: --requests FILE, many at once).

Statistics are cached under --stats-dir (default $ROME_FAST_CACHE/stats, i.e.
~/.cache/rome_fast/stats) in the reference's layout, so reference .npz files placed there load.
Without --corpus: hparams.mom2_dataset when it is a local file or folder; its cached statistics;
for the embedded model WikiText-2 as shipped with the package ($ROME_FAST_CORPUS overrides); for
other models the Hugging Face dataset mom2_dataset when `datasets` is installed. `stats`
checkpoints and resumes, shards under torchrun and can stop once converged (docs/statistics.md)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


EDIT_METHODS = ("rome", "memit", "alphaedit")  # the CLI's --method choices


def edit_backend_names() -> list[str]:
    """The CLI's --backend choices: every registered implementation of the methods (backend.py)."""
    from . import alphaedit, memit  # noqa: F401  (registers MEMIT's and AlphaEdit's backends)
    from .backend import backend_names
    return sorted({name for m in EDIT_METHODS for name in backend_names(m)})


def _stats_dir(args) -> Path:
    from .stats import default_stats_dir
    return Path(args.stats_dir) if args.stats_dir else default_stats_dir()


def _corpus(args, mt, hp, stats_dir):
    """(corpus, hparams) for the statistics (`statistics_corpus`). --samples replaces
    hparams.mom2_n_samples (the presets' 100000 takes every text of a smaller corpus, so the
    cache file is the one `rome-fast eval` and the demo use)."""
    if args.samples is not None:
        hp = dataclasses.replace(hp, mom2_n_samples=args.samples)
    corpus = statistics_corpus(args.corpus, args.model, mt.model, hp, stats_dir)
    if corpus and corpus != args.corpus:
        print(f"corpus: {corpus}")
    return corpus, hp


def statistics_corpus(corpus, model_spec, model, hp, stats_dir):
    """The corpus for an edit's statistics when they are computed: `corpus` if given; else
    hparams.mom2_dataset when it is a local file; else None when no corpus is needed (no
    mom2_adjustment, or the mom2_dataset's statistics of every edited layer are cached); else, for the embedded model,
    the default corpus (WikiText-2, shipped with the package); else None when `datasets` can load
    mom2_dataset from the Hugging Face hub (the reference's Wikipedia), or an error saying what
    to pass."""
    import importlib.util

    from ..models import adapter_for
    from ..models.loading import EMBEDDED_ALIASES
    from .corpus import default_corpus, local_corpus
    from .stats import stats_model_name, stats_path

    if corpus or not hp.mom2_adjustment:
        return corpus
    local = local_corpus(None, hp.mom2_dataset)
    if local is not None:
        return str(local)
    a = adapter_for(model)
    missing = [p for p in (stats_path(stats_dir, stats_model_name(model), hp.mom2_dataset, a.rewrite_name(layer),
                                      hp.mom2_dtype, ("mom2",), hp.mom2_n_samples, act_dtype=hp.mom2_act_dtype)
                           for layer in hp.layers) if not p.is_file()]
    if not missing:  # every edited layer's statistics are cached
        return None
    cached = missing[0]
    if str(model_spec).lower() in EMBEDDED_ALIASES:
        return str(default_corpus())
    if importlib.util.find_spec("datasets") is not None:
        return None
    raise ValueError(f"no statistics cached at {cached}: give --corpus FILE (a text file), or install "
                     f"`datasets` to compute them from the Hugging Face dataset {hp.mom2_dataset!r}")


def _samples(value: str):
    """--samples: a positive count, or 'all'."""
    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of texts or 'all', got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--samples must be positive, got {n}")
    return n


def _probe_requests(path, limit) -> list[dict]:
    """The edit requests of a CounterFact or zsRE file (whichever it holds)."""
    from ..eval.datasets import load_counterfact, load_zsre
    try:
        records = load_counterfact(path, limit)
    except ValueError as cf_error:
        try:
            records = load_zsre(path, limit)
        except ValueError:
            raise ValueError(f"--probe-requests {path}: neither CounterFact nor zsRE records ({cf_error})") from None
    return [r.request() for r in records]


def cmd_stats(args) -> int:
    from .. import distributed
    from ..models import load_model_spec
    from .corpus import default_corpus
    from .stats import corpus_ds_name, layer_stats

    corpus = args.corpus or default_corpus()
    scale = dict(seed=args.seed, until_converged=args.until_converged, checkpoint_minutes=args.checkpoint_minutes,
                 checkpoint_texts=args.checkpoint_texts, restart=args.restart)
    if args.backend == "reference":
        fast_only = {"--until-converged": args.until_converged is not None, "--probe-requests": args.probe_requests,
                     "--seed": args.seed != 1, "--checkpoint-texts": args.checkpoint_texts is not None,
                     "--restart": args.restart, "--act-dtype": args.act_dtype not in (None, "float32"),
                     "torchrun": distributed.env_info().distributed}
        used = [k for k, v in fast_only.items() if v]
        if used:
            raise ValueError(f"{', '.join(used)}: only with the fast backend (the reference collector runs "
                             "in one process, without checkpoints)")
    info = distributed.init()  # a no-op unless torchrun started several processes
    try:
        mt = load_model_spec(args.model, device=info.device if info.distributed else args.device)
        stats_dir = _stats_dir(args)
        for layer in args.layer:
            if not 0 <= layer < mt.num_layers:
                raise ValueError(f"layer {layer} out of range for a {mt.num_layers}-layer model")
        names = [mt.adapter.rewrite_name(layer) for layer in args.layer]
        ds_name = corpus_ds_name(corpus)
        t0 = time.time()
        if args.backend == "fast":  # every layer in one packed pass
            from .fast_stats import layer_stats_fast
            probes = _probe_requests(args.probe_requests, args.probe_limit) if args.probe_requests else None
            run = {}
            got = layer_stats_fast(mt.model, mt.tokenizer, names, stats_dir, ds_name, sample_size=args.samples,
                                   precision=args.precision, batch_tokens=args.batch_tokens, corpus=corpus,
                                   act_dtype=args.act_dtype, progress=not args.no_progress, probe_requests=probes,
                                   shard=True, stats_out=run, after_round=distributed.failure_hook("round", info),
                                   **scale)
        else:
            run = {}
            got = {n: layer_stats(mt.model, mt.tokenizer, n, stats_dir, ds_name, sample_size=args.samples,
                                  precision=args.precision, batch_tokens=args.batch_tokens, corpus=corpus,
                                  progress=not args.no_progress) for n in names}
    except (OSError, FloatingPointError) as exc:  # a checkpoint that cannot be written, NaN keys
        print(f"rome-fast: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.finalize()
    if not info.is_main:
        return 0
    dt = time.time() - t0
    for name, st in got.items():
        count, width = st.mom2.count, st.mom2.mom2.shape[0]
        print(f"{name}: {count} keys of width {width} -> {st.path}")
        if count < width:
            print(f"rome-fast: warning: {name}: {count} keys for a key width of {width} give a singular C, "
                  f"which editing refuses. Collect at least {width} keys (ten times as many for a "
                  f"well-conditioned C) from more texts (--samples) or a bigger --corpus", file=sys.stderr)
    if run:
        if run.get("local_tokens"):
            print(f"{run['texts']} texts, {run['tokens']} tokens; this run summed {run['local_tokens']} tokens "
                  f"in {run['seconds']:.1f} s ({run['local_tokens'] / max(run['seconds'], 1e-9):.0f} tokens/s"
                  f"{' on rank 0' if info.distributed else ''})")
        last = run["curve"][-1]["max_change"] if run.get("curve") else None
        if args.until_converged is not None:
            if run.get("converged"):
                print(f"converged: C⁻¹k moved by {last:.3g} < {args.until_converged} over the last doubling; "
                      f"edit with these statistics by setting mom2_n_samples = {run['texts']} "
                      f"(--samples {run['texts']})")
            else:
                why = ("too few doublings to compare" if last is None
                       else f"last change {last:.3g} >= {args.until_converged}")
                print(f"not converged within the sample ({why}): collect more texts (--samples) or a larger corpus")
    else:
        print(f"{len(names)} layer(s) in {dt:.1f} s (cached, or the reference collector)")
    return 0


def cmd_edit(args) -> int:
    if args.method in ("memit", "alphaedit"):
        return cmd_edit_memit(args)
    if args.requests or not (args.prompt and args.subject and args.target):
        raise ValueError("ROME edits one fact: give --prompt, --subject and --target (--requests FILE is "
                         "for --method memit)")
    from ..models import load_model
    from .demo import greedy_completion, hparams_for, target_probability
    from .hparams import ROMEHyperParams
    from .requests import normalize_request
    from .rome import apply_rome_to_model
    from .templates import get_context_templates

    # everything that needs no model is checked before the model loads
    request = normalize_request({"prompt": args.prompt, "subject": args.subject,
                                 "target_new": {"str": args.target}})
    hp = ROMEHyperParams.from_json(args.hparams) if args.hparams else None
    if hp is not None and args.layer is not None:
        hp.layers = [args.layer]
    mt = load_model(args.model, device=args.device)
    model, tok = mt.model, mt.tokenizer
    if hp is None:
        hp = hparams_for(mt, args.layer)
    stats_dir = _stats_dir(args)
    corpus, hp = _corpus(args, mt, hp, stats_dir)
    text = request["prompt"].format(request["subject"])
    target = request["target_new"]["str"]
    probes = [text] + list(args.probe or [])

    def show(title):
        print(title)
        for p in probes:
            print(f"  {p!r} -> {greedy_completion(model, tok, p, args.max_new_tokens)!r}   "
                  f"p({target!r}) = {target_probability(model, tok, p, target):.4f}")

    show("before:")
    templates = get_context_templates(model, tok, hp.context_template_length_params, args.seed)
    t0 = time.time()
    model, orig = apply_rome_to_model(model, tok, [request], hp, return_orig_weights=True,
                                      context_templates=templates, stats_dir=stats_dir, corpus=corpus,
                                      key_mode=args.key_mode, seed=args.seed, backend=args.backend)
    print(f"edited {', '.join(orig)} in {time.time() - t0:.1f} s")
    show("after:")
    save_edit(args, model, orig, {"request": json.dumps(request), "hparams": json.dumps(hp.to_dict()),
                                  "model": mt.name})
    return 0


def load_requests(path) -> list[dict]:
    """A JSON list of requests in ROME's format: {"prompt": "{} is located in", "subject": ...,
    "target_new": {"str": " Rome"}} (a bare string target is accepted)."""
    from .memit.main import normalize_requests
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"requests file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return normalize_requests(data, f"{path}: ")


def cmd_edit_memit(args) -> int:
    """`rome-fast edit --method memit|alphaedit --requests FILE.json`: many facts edited at once,
    with the probability of each new target before and after."""
    from ..models import load_model_spec
    from .demo import target_probability
    from .memit import MEMITHyperParams, apply_memit_to_model

    m = args.method
    if args.prompt or args.subject or args.target or args.layer is not None or args.key_mode != "reference":
        raise ValueError(f"--method {m} takes its requests from --requests FILE (and its layers from --hparams); "
                         "--prompt/--subject/--target/--layer/--key-mode are ROME options")
    if not args.requests:
        raise ValueError(f"--method {m} needs --requests FILE: a JSON list of {{prompt, subject, target_new}}")
    if m == "alphaedit":  # one batch, projected into the statistics' null space (no earlier batches)
        from .alphaedit import AlphaEditHyperParams as H, apply_alphaedit_to_model

        def apply_memit_to_model(*a, **k):  # noqa: F811
            return apply_alphaedit_to_model(*a, **k)[:2]
    else:
        H = MEMITHyperParams
    requests = load_requests(args.requests)
    mt = load_model_spec(args.model, device=args.device)
    model, tok = mt.model, mt.tokenizer
    hp = H.from_json(args.hparams) if args.hparams else H.for_model(model, name=mt.name)
    stats_dir = _stats_dir(args)
    corpus, hp = _corpus(args, mt, hp, stats_dir)

    def show(title):
        print(title)
        for r in requests:
            text, target = r["prompt"].format(r["subject"]), r["target_new"]["str"]
            print(f"  {text!r}: p({target!r}) = {target_probability(model, tok, text, target):.4f}")
        for p in args.probe or []:
            print(f"  {p!r}: p({requests[0]['target_new']['str']!r}) = "
                  f"{target_probability(model, tok, p, requests[0]['target_new']['str']):.4f}")

    show("before:")
    t0 = time.time()
    model, orig = apply_memit_to_model(model, tok, requests, hp, return_orig_weights=True, stats_dir=stats_dir,
                                       corpus=corpus, seed=args.seed, backend=args.backend)
    print(f"edited {len(requests)} fact(s) into {', '.join(orig)} in {time.time() - t0:.1f} s")
    show("after:")
    save_edit(args, model, orig, {"requests": json.dumps(requests), "hparams": json.dumps(hp.to_dict()),
                                  "model": mt.name})
    return 0


def save_edit(args, model, orig: dict, meta: dict) -> None:
    """--save-weights / --save-delta: the edited tensors, or their changes, as safetensors."""
    if args.save_weights or args.save_delta:
        from safetensors.torch import save_file
        if args.save_weights:  # only the tensors the edit changed
            save_file({n: model.get_parameter(n).detach().cpu().contiguous() for n in orig},
                      args.save_weights, metadata=meta)
            print(f"edited weights -> {args.save_weights} (load with load_state_dict(strict=False))")
        else:  # Ŵ = W + ΔW with ΔW = (W_edited − W) stored in the weight's own layout
            save_file({n: (model.get_parameter(n).detach() - w).cpu().contiguous() for n, w in orig.items()},
                      args.save_delta, metadata=meta)
            print(f"weight deltas -> {args.save_delta} (add each to its weight)")


def add_parsers(sub) -> None:

    s = sub.add_parser("stats", help="second-moment statistics of a layer's MLP keys (cached, resumable; "
                                     "run under torchrun to shard)")
    s.add_argument("--model", default="smollm2-135m", help="hub id, local path, .gguf, or smollm2-135m")
    s.add_argument("--layer", type=int, nargs="+", required=True, help="layer number(s)")
    s.add_argument("--corpus", help="text file, JSONL file (a 'text' field a line), folder of them, or a "
                                    "Hugging Face dataset name[:config]; default: WikiText-2, shipped with the package")
    s.add_argument("--samples", type=_samples, default=100000,
                   help="number of texts, or 'all' (default 100000 as the reference; a smaller corpus is used whole)")
    s.add_argument("--until-converged", type=float, metavar="TOL",
                   help="stop at the first doubling of the sample where C⁻¹k moved by less than TOL "
                        "(relative, largest over the probe keys); the file records the texts used")
    s.add_argument("--probe-requests", metavar="FILE",
                   help="CounterFact or zsRE file whose requests' keys probe the convergence (default: built-in facts)")
    s.add_argument("--probe-limit", type=int, default=100, help="requests read from --probe-requests")
    s.add_argument("--seed", type=int, default=1, help="seed of the fixed random subset (the reference's: 1)")
    s.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="checkpoint every this many minutes (default 10; resume by rerunning the command)")
    s.add_argument("--checkpoint-texts", type=int, default=None, help="... or every this many texts")
    s.add_argument("--restart", action="store_true", help="discard a checkpoint and start over")
    s.add_argument("--stats-dir", help="cache folder (default $ROME_FAST_CACHE/stats)")
    s.add_argument("--precision", default="float32", choices=["float32", "float64"])
    s.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward (default 3x context)")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    s.add_argument("--backend", default="fast", choices=["reference", "fast"],
                   help="fast: all layers in one packed pass (same files)")
    s.add_argument("--act-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="fast backend: run the forward in this precision (sums stay in --precision; "
                        "approximate statistics, cached under their own file name)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_stats)

    e = sub.add_parser("edit", help="rewrite one fact with ROME (or many at once with MEMIT) and show before/after")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--method", default="rome", choices=EDIT_METHODS,
                   help="rome: --prompt/--subject/--target; memit: --requests FILE, all edited at once")
    e.add_argument("--requests", help="MEMIT: a JSON list of requests {prompt (with {}), subject, target_new}")
    e.add_argument("--prompt", help="with {} for the subject, e.g. '{} is located in'")
    e.add_argument("--subject")
    e.add_argument("--target", help="the new object, e.g. ' Rome'")
    e.add_argument("--layer", type=int, default=None, help="ROME edit layer (default: the preset's)")
    e.add_argument("--hparams", help="a ROME (or MEMIT) hyperparameter JSON file (reference format)")
    e.add_argument("--corpus", help="text file for the statistics (default: hparams.mom2_dataset's cached "
                                    "statistics or text file, else WikiText-2 for the embedded model)")
    e.add_argument("--samples", type=int, default=None,
                   help="texts for the statistics (default: the preset's mom2_n_samples, 100000)")
    e.add_argument("--stats-dir", help="statistics cache (default $ROME_FAST_CACHE/stats)")
    e.add_argument("--key-mode", default="reference", choices=["reference", "r-rome"])
    e.add_argument("--backend", default="fast", choices=edit_backend_names(), help="implementation of --method")
    e.add_argument("--seed", type=int, default=0, help="seed of the context-template sampling")
    e.add_argument("--probe", action="append", help="another prompt to complete before/after (repeatable)")
    e.add_argument("--max-new-tokens", type=int, default=8)
    g = e.add_mutually_exclusive_group()
    g.add_argument("--save-weights", help="write the edited weight tensors here (safetensors)")
    g.add_argument("--save-delta", help="write the weight changes here (safetensors)")
    e.add_argument("--device", default=None)
    e.set_defaults(func=cmd_edit)
