"""`rome-fast edit --method memit --requests FILE.json`: many facts edited at once, with the
probability of each new target before and after."""
from __future__ import annotations

import json
import time
from pathlib import Path


def load_requests(path) -> list[dict]:
    """A JSON list of requests in ROME's format: {"prompt": "{} is located in", "subject": ...,
    "target_new": {"str": " Rome"}} (a bare string target is accepted)."""
    from .main import normalize_requests
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"requests file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return normalize_requests(data, f"{path}: ")


def cmd_edit_memit(args) -> int:
    import dataclasses

    from ...trace.commands import load_model_spec
    from ..commands import _corpus, _stats_dir, save_edit
    from ..demo import target_probability
    from .hparams import MEMITHyperParams
    from .main import apply_memit_to_model

    m = args.method
    if args.prompt or args.subject or args.target or args.layer is not None or args.key_mode != "reference":
        raise ValueError(f"--method {m} takes its requests from --requests FILE (and its layers from --hparams); "
                         "--prompt/--subject/--target/--layer/--key-mode are ROME options")
    if not args.requests:
        raise ValueError(f"--method {m} needs --requests FILE: a JSON list of {{prompt, subject, target_new}}")
    if m == "alphaedit":  # one batch: projected into the statistics' null space (no earlier batches)
        from ..alphaedit import AlphaEditHyperParams as H, apply_alphaedit_to_model

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
