"""The reference's `experiments/causal_trace.py` (and its Fig. 3 notebook's `trace_with_repatch`),
backed by rome_fast: change `from experiments.causal_trace import …` to
`from rome_fast.compat.experiments.causal_trace import …`.

Names, parameters, defaults and results are the reference's (docs/dropin.md): `calculate_hidden_flow`
returns `high_score` as a 0-dim tensor and, for a mispredicted fact, only
`{"correct_prediction": False}`; the plots show the figure when `savepdf` is not given and write
exactly `savepdf` otherwise. Beyond the reference, each function taking a model also takes the
keyword-only `backend=` ("fast", the default, or "reference"), `calculate_hidden_flow` takes
`answer=` (a whole answer string scored teacher-forced), and every model family
rome_fast supports works."""
from __future__ import annotations

import os

import torch

from ...models import ModelAndTokenizer
from ...tokens import decode_tokens, find_token_range
from ...tokens import make_inputs as _make_inputs
from ...trace import plots as _plots
from ...trace.api import DEFAULT_BACKEND
from ...trace.api import calculate_hidden_flow as _calculate_hidden_flow
from ...trace.noise import collect_embedding_std, embedding_mean_cov, gaussian_factor, student_t_transform
from ...trace.plots import guess_subject
from ...trace.reference import (layername, predict_from_input, predict_token, trace_important_states,
                                trace_important_window, trace_with_patch, trace_with_repatch)
from ...trace.severed import calculate_severed_flow, plot_severed_comparison


def make_inputs(tokenizer, prompts, device="cuda"):
    """Left-padded batch, as the reference. Its default device is "cuda"; on a machine without
    CUDA that default means the CPU, so the reference's calls run anywhere."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    return _make_inputs(tokenizer, prompts, device=device)


def calculate_hidden_flow(mt, prompt, subject, samples=10, noise=0.1, token_range=None, uniform_noise=False,
                          replace=False, window=10, kind=None, expect=None, *, backend=DEFAULT_BACKEND,
                          answer=None):
    """The reference's causal trace of one fact and one kind, its result dict exactly."""
    result = _calculate_hidden_flow(mt, prompt, subject, samples=samples, noise=noise, token_range=token_range,
                                    uniform_noise=uniform_noise, replace=replace, window=window, kind=kind,
                                    expect=expect, backend=backend, answer=answer)
    if not result["correct_prediction"]:
        return dict(correct_prediction=False)
    result["high_score"] = torch.tensor(result["high_score"])
    return result


def _show(fig) -> None:
    """Display a figure made without pyplot: inline in a notebook, else in pyplot's window."""
    try:
        from IPython import get_ipython
        if get_ipython() is not None:
            from IPython.display import display
            display(fig)
            return
    except ImportError:
        pass
    from matplotlib import pyplot as plt
    manager = plt.figure(figsize=fig.get_size_inches(), dpi=fig.dpi).canvas.manager
    manager.canvas.figure = fig
    fig.set_canvas(manager.canvas)
    plt.show()


def _show_or_save(fig, savepdf) -> None:
    if savepdf:
        folder = os.path.dirname(savepdf)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fig.savefig(savepdf, bbox_inches="tight")
    else:
        _show(fig)


def plot_trace_heatmap(result, savepdf=None, title=None, xlabel=None, modelname=None):
    """The reference's heat map: written to exactly `savepdf`, or shown when it is not given."""
    _show_or_save(_plots.plot_trace_heatmap(result, None, title=title, xlabel=xlabel, modelname=modelname),
                  savepdf)


def plot_hidden_flow(mt, prompt, subject=None, samples=10, noise=0.1, uniform_noise=False, window=10,
                     kind=None, savepdf=None, *, backend=DEFAULT_BACKEND):
    if subject is None:
        subject = guess_subject(prompt)
    result = calculate_hidden_flow(mt, prompt, subject, samples=samples, noise=noise,
                                   uniform_noise=uniform_noise, window=window, kind=kind, backend=backend)
    plot_trace_heatmap(result, savepdf)


def plot_all_flow(mt, prompt, subject=None, *, backend=DEFAULT_BACKEND):
    for kind in ("mlp", "attn", None):  # the reference's order
        plot_hidden_flow(mt, prompt, subject, kind=kind, backend=backend)


def main(argv=None):
    """The reference's command line (`python -m experiments.causal_trace`), same flags: every known
    fact, every kind, into `{output_dir}/cases/knowledge_{id}[_mlp|_attn].npz` and heat maps of
    facts with id <= 200 into `{output_dir}/pdfs/`, with output_dir's `{model_name}` filled as the
    reference fills it (`n{noise}_r{replace}_{model}`). On rome_fast's batched engine, resumable;
    it also writes the averaged effects (summary.json and figures) at the end. --model_name takes
    any model rome_fast loads (a hub id, a local folder, "smollm2-135m", "tiny:<family>")."""
    import argparse
    import json

    from ...models import load_model_spec
    from ...trace.commands import print_trace_summary
    from ...trace.runner import trace_facts
    from ..dsets import KnownsDataset
    from ..util.globals import DATA_DIR

    parser = argparse.ArgumentParser(description="Causal Tracing")
    parser.add_argument("--model_name", default="gpt2-xl")
    parser.add_argument("--fact_file", default=None)
    parser.add_argument("--output_dir", default="results/{model_name}/causal_trace")
    parser.add_argument("--noise_level", default="s3", help="a std, or sK, m, tD, uX (the reference's rules)")
    parser.add_argument("--replace", default=0, type=int)
    args = parser.parse_args(argv)

    mt = load_model_spec(args.model_name)
    if args.fact_file is None:
        knowns = list(KnownsDataset(DATA_DIR))
    else:
        with open(args.fact_file) as f:
            knowns = json.load(f)
    noise = args.noise_level
    texts = None
    if noise == "m" or noise.startswith("t"):  # fitted to embeddings: the corpus get_embedding_cov reads
        from ...edit.corpus import default_corpus, read_text_file
        texts = read_text_file(default_corpus())
    modeldir = f"n{noise}_r{args.replace}_{args.model_name.replace('/', '_')}"
    out = args.output_dir.format(model_name=modeldir)
    summary = trace_facts(mt, knowns, out, kinds="all", noise=noise, replace=bool(args.replace),
                          noise_texts=texts, case_plots=True)
    print_trace_summary(summary)


# ---- the 'm' and 'tN' noise rules ----------------------------------------------------------------

def get_embedding_cov(mt):
    """Mean and covariance (float64) of the word embeddings over 1,000 texts of at most 100 tokens.
    The reference reads WikiText-103 through `datasets`; this reads $ROME_FAST_CORPUS when set,
    else the WikiText-2 test split shipped with rome_fast, so it works offline."""
    from ...edit.corpus import default_corpus, read_text_file
    return embedding_mean_cov(mt, read_text_file(default_corpus()), max_texts=1000, max_tokens=100)


def make_generator_transform(mean=None, cov=None):
    """A float64 linear map taking standard-normal draws to N(mean, cov) (identity covariance or
    zero mean when one is None), as an `nn.Linear` the tracers call as their noise."""
    d = len(mean) if mean is not None else len(cov)
    device = mean.device if mean is not None else cov.device
    layer = torch.nn.Linear(d, d, dtype=torch.float64).to(device).requires_grad_(False)
    with torch.no_grad():
        layer.bias[...] = 0 if mean is None else mean
        layer.weight[...] = torch.eye(d, device=device) if cov is None else gaussian_factor(cov).to(device)
    return layer


def collect_embedding_gaussian(mt):
    return make_generator_transform(*get_embedding_cov(mt))


def collect_embedding_tdist(mt, degree=3):
    return student_t_transform(collect_embedding_gaussian(mt), float(degree))


__all__ = ["ModelAndTokenizer", "calculate_hidden_flow", "main", "calculate_severed_flow", "collect_embedding_gaussian",
           "collect_embedding_std", "collect_embedding_tdist", "decode_tokens", "find_token_range",
           "get_embedding_cov", "guess_subject", "layername", "make_generator_transform", "make_inputs",
           "plot_all_flow", "plot_hidden_flow", "plot_severed_comparison", "plot_trace_heatmap",
           "predict_from_input", "predict_token", "trace_important_states", "trace_important_window",
           "trace_with_patch", "trace_with_repatch"]


if __name__ == "__main__":
    main()
