"""The reference's `experiments/py/demo.py`, which its ROME notebook imports:
`demo_model_editing`, `load_alg`, `print_loud`, `stop_execution`.

Hyperparameters are read from `HPARAMS_DIR/ROME/<model name>.json` as the reference does; when
that file does not exist, rome_fast's bundled preset for the model is used (SmolLM2-135M, GPT-2,
GPT-J, NeoX), so the notebook runs without a hyperparameter folder."""
from __future__ import annotations

from ....edit.stats import stats_model_name
from ...rome import ROMEHyperParams, apply_rome_to_model
from ...util import globals as _globals
from ...util.generate import generate_fast

ALGORITHMS = {"ROME": (ROMEHyperParams, apply_rome_to_model, "ROME", "")}


def load_alg(alg_name):
    """(hyperparameter class, apply function, hparams folder, file-name suffix) of an algorithm.
    Only ROME is available here (the reference's baselines FT, KN, MEND, KE are not ported)."""
    if alg_name not in ALGORITHMS:
        raise ValueError(f"unknown or unported editing algorithm {alg_name!r}: rome_fast.compat offers "
                         f"{', '.join(ALGORITHMS)}")
    return ALGORITHMS[alg_name]


def _hparams(model, alg_name):
    params_class, _, prefix, suffix = load_alg(alg_name)
    name = stats_model_name(model)  # the reference's _name_or_path with '/' -> '_' (a local path: its last part)
    path = _globals.HPARAMS_DIR / prefix / f"{name}{suffix}.json"
    if path.is_file():
        print("Loading from", path)
        return params_class.from_json(path)
    print(f"{path} does not exist: using rome_fast's bundled preset for {name}")
    return params_class.for_model(model)


def demo_model_editing(model, tok, requests, generation_prompts, alg_name="ROME"):
    """Generate from the prompts, apply the edit, generate again and print both side by side.
    Returns (edited model, original values of the changed weights)."""
    print_loud(f"Retrieving {alg_name} hyperparameters")
    hparams = _hparams(model, alg_name)
    print(hparams)
    _, apply_method, _, _ = load_alg(alg_name)

    print_loud("Generating pre-update text")
    pre = generate_fast(model, tok, generation_prompts, max_out_len=100)
    print(pre)

    print_loud(f"Applying {alg_name} to model")
    model_new, orig_weights = apply_method(model, tok, requests, hparams, return_orig_weights=True)

    print_loud("Generating post-update text")
    post = generate_fast(model_new, tok, generation_prompts, max_out_len=100)
    print(post)

    print_loud("Summarizing differences")
    labels = ("[Prompt]:", f"[Post-{alg_name}]:", f"[Pre-{alg_name}]:")
    width = 1 + max(len(s) for s in labels)
    for i, texts in enumerate(zip(generation_prompts, post, pre)):
        if i > 0:
            print("-" * 10)
        for label, text in zip(labels, texts):
            print(label.ljust(width), text)
    return model_new, orig_weights


def print_loud(x, pad=3):
    """`x` in a box of '#', for emphasis."""
    inner = len(x) + 2 * (pad - 1)
    print()
    print("#" * (inner + 2))
    print("#" + " " * inner + "#")
    print("#" + " " * (pad - 1) + x + " " * (pad - 1) + "#")
    print("#" + " " * inner + "#")
    print("#" * (inner + 2))


class StopExecution(Exception):
    """Ends a notebook cell quietly (IPython shows no traceback for it)."""

    def _render_traceback_(self):
        return []


def stop_execution():
    raise StopExecution


__all__ = ["StopExecution", "demo_model_editing", "load_alg", "print_loud", "stop_execution"]
