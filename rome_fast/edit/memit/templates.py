"""MEMIT's context templates: two groups, the bare prompt ["{}"] and five short texts sampled from
the model (one each after "The", "Therefore", "Because", "I", "You"; 10 tokens in all, top-5
sampling), each followed by ". {}". Keys are averaged within each group and then across the two
groups, so the bare prompt weighs 1/2 and each prefixed one 1/10.

The reference samples them once per process without a seed; here the sampling is seeded (its own
generator, the global RNG is untouched) and cached per (model, seed)."""
from __future__ import annotations

PROMPTS = ("The", "Therefore", "Because", "I", "You")
LENGTH = 10  # tokens per sampled text, the prompt word included

_CACHE: dict = {}


def generate_context_templates(model, tok, seed: int = 0) -> list[list[str]]:
    from ...eval.generation import generate

    was_training = model.training
    model.eval()
    try:
        texts = generate(model, tok, list(PROMPTS), max_out_len=LENGTH, top_k=5, seed=seed)
    finally:
        model.train(was_training)
    # a brace would break str.format when the prompt and subject are filled in
    return [["{}"], [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]]


def get_context_templates(model, tok, seed: int = 0, cache: bool = True) -> list[list[str]]:
    """The two template groups for `model`, generated once per (model, seed) for the process (as
    the reference generates them at the first edit and keeps them)."""
    key = (id(model), getattr(model.config, "_name_or_path", ""), int(seed))
    if cache and key in _CACHE:
        return [list(g) for g in _CACHE[key]]
    groups = generate_context_templates(model, tok, seed)
    if cache:
        _CACHE[key] = groups
    return [list(g) for g in groups]


def check_templates(groups) -> list[list[str]]:
    """Validated template groups: a list of non-empty lists of strings with one '{}' each."""
    if (not isinstance(groups, (list, tuple)) or not groups
            or not all(isinstance(g, (list, tuple)) and g for g in groups)):
        raise ValueError("context_templates must be a list of non-empty lists of templates, e.g. "
                         "[['{}'], ['Some text. {}', ...]]")
    for g in groups:
        for t in g:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"context template {t!r} must contain '{{}}' exactly once")
    return [list(g) for g in groups]


def flat(groups) -> list[str]:
    return [t for g in groups for t in g]


def clear_cache() -> None:
    _CACHE.clear()
