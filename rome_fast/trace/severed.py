"""The severed-path experiment (the paper's Fig. 3): the effect of restoring one hidden state while
the MLP (or attention) outputs at that token stay, in every layer, at their corrupted values.

`calculate_severed_flow` runs it on either backend ("reference": `trace_with_repatch`, two
forwards per cell; "fast": the batched engine's `sever=` option) and returns the reference's result
dict (as its notebook's `calculate_hidden_flow_3`: the corrupted baseline is the ordinary one, no
prediction check); `plot_severed_comparison` draws the figure: for each layer, p(answer) with the
hidden state restored, ordinarily and with attention or MLP severed."""
from __future__ import annotations

from ..tokens import find_token_range, make_inputs
from .api import DEFAULT_BACKEND, _token_rows, _validate, check_prompt
from .engine import FactInput, TraceEngine
from .kinds import get_kind
from .noise import NoiseSpec, noise_draws
from .reference import predict_from_input, trace_important_states, trace_severed_states, trace_with_patch
from .results import result_dict

SEVER_CHOICES = (None, "mlp", "attn")


def calculate_severed_flow(mt, prompt: str, subject: str, samples: int = 10, noise: NoiseSpec = 0.1,
                           token_range="subject_last", uniform_noise: bool = False, sever: str | None = None,
                           backend: str = DEFAULT_BACKEND, engine: TraceEngine | None = None) -> dict:
    """Scores (tokens × layers) of restoring each hidden state with the `sever` module kind ("mlp",
    "attn") frozen at its corrupted output at the restored token in every layer; sever=None is the
    ordinary hidden-state trace. token_range as `calculate_hidden_flow` (default: the last subject
    token, as the paper's figure)."""
    if sever not in SEVER_CHOICES:
        raise ValueError(f"sever must be None, 'mlp' or 'attn', not {sever!r}")
    if backend not in ("reference", "fast"):
        raise ValueError(f"unknown backend {backend!r}: use 'reference' or 'fast'")
    token_range = _validate(prompt, subject, samples, 10, token_range, noise)
    check_prompt(mt, prompt, subject)
    if backend == "fast":
        return _severed_fast(mt, prompt, subject, samples, noise, token_range, uniform_noise, sever, engine)
    inp = make_inputs(mt.tokenizer, [prompt] * (samples + 1), device=mt.device)
    answer_t, base_score = [d[0] for d in predict_from_input(mt.model, inp)]
    input_ids = inp["input_ids"][0].cpu()
    e_range = find_token_range(mt.tokenizer, input_ids.tolist(), subject)
    rows = _token_rows(token_range, e_range, len(input_ids))
    low = trace_with_patch(mt.model, inp, [], answer_t, e_range, noise=noise, uniform_noise=uniform_noise).item()
    args = dict(noise=noise, uniform_noise=uniform_noise, token_range=rows)
    if sever is None:
        scores = trace_important_states(mt.model, mt.num_layers, inp, e_range, answer_t, **args)
    else:
        scores = trace_severed_states(mt.model, mt.num_layers, inp, e_range, answer_t, sever, **args)
    return result_dict(mt.tokenizer, input_ids, int(answer_t), base_score.item(), 10, None,
                       scores=scores.detach().cpu(), low_score=low, subject_range=e_range)


def _severed_fast(mt, prompt, subject, samples, noise, token_range, uniform_noise, sever, engine):
    ids = mt.tokenizer.encode(prompt)
    b, e = find_token_range(mt.tokenizer, ids, subject)
    first, second = noise_draws(samples, e - b, mt.adapter.hidden_size, noise, uniform_noise, count=2)
    fact = FactInput(ids, (b, e), first, tokens=_token_rows(token_range, (b, e), len(ids)), sever_noise=second)
    res = (engine or TraceEngine(mt)).trace([fact], kinds=("hidden",), sever=sever)[0]
    return result_dict(mt.tokenizer, ids, res.answer, res.high_score, 10, None, scores=res.scores["hidden"],
                       low_score=res.low_score, subject_range=(b, e))


def plot_severed_comparison(results: dict, savepdf=None, title=None, modelname=None):
    """Fig. 3 for one token: bars per layer of the indirect effect (score − low_score) of restoring
    the hidden state, ordinarily (None) and with "attn" / "mlp" severed. `results` maps each of
    those keys to a `calculate_severed_flow` dict with a single token row. Returns the Figure, or
    with `savepdf` writes it (and a PNG beside it) and returns the paths."""
    import matplotlib
    import numpy as np

    from .plots import _RC, _new_figure, save_figure

    if not results or any(k not in SEVER_CHOICES for k in results):
        raise ValueError("results must map None, 'mlp' and/or 'attn' to calculate_severed_flow dicts")
    labels = {None: "Effect of single state on p", "attn": "Effect with Attn severed",
              "mlp": "Effect with MLP severed"}
    colours = {None: get_kind(None).cmap, "attn": get_kind("attn").cmap, "mlp": get_kind("mlp").cmap}
    keys = [k for k in SEVER_CHOICES if k in results]
    width = 0.8 / len(keys)
    with matplotlib.rc_context(_RC):
        fig = _new_figure((6, 1.8))
        ax = fig.add_subplot()
        for i, k in enumerate(keys):
            r = results[k]
            scores = np.asarray(r["scores"], dtype=float)
            if scores.shape[0] != 1:
                raise ValueError("plot one token row per result (token_range='subject_last')")
            effect = scores[0] - float(np.asarray(r["low_score"]))
            x = np.arange(len(effect)) + (i - (len(keys) - 1) / 2) * width
            ax.bar(x, effect, width=width, label=labels[k], color=matplotlib.colormaps[colours[k]](0.7))
        ax.set_xlabel(f"Layer at which the single hidden state is restored ({modelname or 'GPT'})")
        ax.set_ylabel("Indirect effect")
        ax.set_title(title or "Impact of restoring a hidden state, with paths severed")
        ax.legend(frameon=False, fontsize=7)
        if savepdf:
            return save_figure(fig, savepdf)
    return fig
