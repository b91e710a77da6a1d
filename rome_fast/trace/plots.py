"""Figures: one fact's heat map (as the paper's Fig. 1) and the averaged AIE figures.

Matplotlib's object API with the Agg canvas: no display is needed, no pyplot global state is
touched, and every figure is written as PNG and PDF."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from .api import DEFAULT_BACKEND, calculate_hidden_flow
from .kinds import KINDS, TraceKind, get_kind

# Times-like as the paper, falling back quietly to what is installed.
_RC = {"font.family": "serif", "font.serif": ["Times New Roman", "Times", "Nimbus Roman", "DejaVu Serif"]}


def _new_figure(figsize, dpi=200):
    # imported here so that `import rome_fast` does not pay for matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> list[Path]:
    """Write `path` with .png and .pdf suffixes (whatever suffix it had); returns both paths."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".pdf", ".png") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in (".png", ".pdf"):
        target = stem.parent / (stem.name + ext)
        fig.savefig(target, bbox_inches="tight")
        out.append(target)
    return out


def _as_mapping(result) -> Mapping:
    return result.to_dict() if hasattr(result, "to_dict") else result


def _kind_of(result) -> TraceKind:
    k = result.get("kind")
    return get_kind(str(np.asarray(k).item()) if isinstance(k, np.ndarray) else k)


def plot_trace_heatmap(result, savepdf=None, title=None, xlabel=None, modelname=None):
    """Heat map of one trace: rows are tokens (subject tokens marked '*'), columns layers, colour
    p(answer) from the corrupted score up. With `savepdf`, writes it and a PNG beside it and
    returns the paths; otherwise returns the matplotlib Figure."""
    import matplotlib

    result = _as_mapping(result)
    if "scores" not in result:
        raise ValueError("this result has no scores (the model's prediction was not the expected one)")
    scores = np.asarray(result["scores"], dtype=float)
    low = float(np.asarray(result["low_score"]))
    answer = result.get("answer")
    kind = _kind_of(result)
    window = int(np.asarray(result.get("window", 10)))
    labels = [str(t) for t in list(result["input_tokens"])]
    for i in range(*[int(x) for x in np.asarray(result["subject_range"])]):
        labels[i] = labels[i] + "*"
    n_layers = scores.shape[1]
    with matplotlib.rc_context(_RC):
        fig = _new_figure((3.5, 2))
        ax = fig.add_subplot()
        h = ax.pcolor(scores, cmap=kind.cmap, vmin=low)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(len(scores))])
        ticks = list(range(0, max(1, n_layers - 6), 5))  # every 5 layers, as the paper
        ax.set_xticks([0.5 + i for i in ticks])
        ax.set_xticklabels(ticks)
        ax.set_yticklabels(labels)
        ax.set_title(kind.single_title)
        ax.set_xlabel(kind.single_xlabel.format(model=modelname or "GPT", window=window))
        cb = fig.colorbar(h)
        if title is not None:
            ax.set_title(title)
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        elif answer is not None:
            cb.ax.set_title(f"p({str(np.asarray(answer)).strip()})", y=-0.16, fontsize=10)
        if savepdf:
            return save_figure(fig, savepdf)
    return fig


def guess_subject(prompt: str) -> str:
    """The reference's guess at the subject: from the first capital letter that does not open
    "Who ", "What ", "Where ", "When ", "Which " or "Why ", the rest of that word up to whitespace
    (punctuation kept: 'Audible.com'), then any following words that are a capital letter and
    lowercase letters or apostrophes."""
    m = re.search(r"(?!Wh(?:o|at|ere|en|ich|y) )[A-Z]\S*(?:\s[A-Z][a-z']*)*", prompt)
    if not m:
        raise ValueError(f"no capitalised subject to guess in {prompt!r}: pass subject=")
    return m.group(0).strip()


def plot_hidden_flow(mt, prompt, subject=None, samples=10, noise=0.1, uniform_noise=False, window=10,
                     kind=None, savepdf=None, modelname=None, backend=None):
    """Trace one fact and plot it (the reference's helper); returns the paths or the Figure."""
    if subject is None:
        subject = guess_subject(prompt)
    result = calculate_hidden_flow(mt, prompt, subject, samples=samples, noise=noise,
                                   uniform_noise=uniform_noise, window=window, kind=kind,
                                   backend=backend or DEFAULT_BACKEND)
    return plot_trace_heatmap(result, savepdf, modelname=modelname)


def plot_all_flow(mt, prompt, subject=None, savepdf_stem=None, **kwargs):
    """Every kind for one prompt (savepdf_stem + each kind's suffix: "_mlp", "_attn", "" for hidden
    states, in the reference's order: the window kinds first)."""
    out = []
    for kind in sorted(KINDS.values(), key=lambda k: k.part is None):
        path = f"{savepdf_stem}{kind.suffix}.pdf" if savepdf_stem else None
        out.append(plot_hidden_flow(mt, prompt, subject, kind=kind.argument, savepdf=path, **kwargs))
    return out


# ---- averaged figures of aggregate.KindAggregate's (their `buckets` label the rows) ---------------

def plot_aie_heatmaps(aggs: Mapping, path, modelname=None) -> list[Path]:
    """One panel per kind: AIE (bucket × layer), clipped at 0, one colour scale for all kinds."""
    import matplotlib

    vmax = max(float(np.nanmax(np.clip(a.aie, 0, None))) for a in aggs.values()) or 1e-9
    with matplotlib.rc_context(_RC):
        fig = _new_figure((3.8 * len(aggs), 2.2))
        for i, (name, agg) in enumerate(aggs.items()):
            kind, buckets = get_kind(name), agg.buckets
            ax = fig.add_subplot(1, len(aggs), i + 1)
            h = ax.pcolor(np.nan_to_num(np.clip(agg.aie, 0, None)), cmap=kind.cmap, vmin=0, vmax=vmax)
            ax.invert_yaxis()
            ax.set_yticks([0.5 + j for j in range(len(buckets))])
            ax.set_yticklabels(buckets if i == 0 else [""] * len(buckets))
            n_layers = agg.aie.shape[1]
            ticks = list(range(0, n_layers, 5))
            ax.set_xticks([0.5 + t for t in ticks])
            ax.set_xticklabels(ticks)
            ax.set_title(f"Average indirect effect of {kind.label}\n({agg.n_correct} facts"
                         f"{', ' + modelname if modelname else ''})", fontsize=9)
            ax.set_xlabel(kind.aie_xlabel, fontsize=8)
            fig.colorbar(h, ax=ax)
        return save_figure(fig, path)


def plot_aie_lines(aggs: Mapping, path, modelname=None) -> list[Path]:
    """One panel per kind: AIE per layer for each bucket with its 95 % interval."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _new_figure((4.0 * len(aggs), 2.8))
        for i, (name, agg) in enumerate(aggs.items()):
            kind = get_kind(name)
            ax = fig.add_subplot(1, len(aggs), i + 1)
            layers = np.arange(agg.aie.shape[1])
            for j, bucket in enumerate(agg.buckets):
                if agg.count[j] == 0:
                    continue
                line, = ax.plot(layers, agg.aie[j], label=bucket, linewidth=1)
                ci = np.nan_to_num(agg.ci95[j])
                ax.fill_between(layers, agg.aie[j] - ci, agg.aie[j] + ci, color=line.get_color(), alpha=0.15)
            ax.set_title(f"AIE of {kind.label}{' (' + modelname + ')' if modelname else ''}", fontsize=9)
            ax.set_xlabel(kind.aie_xlabel, fontsize=8)
            if i == 0:
                ax.set_ylabel("AIE (p)", fontsize=8)
            if i == len(aggs) - 1:
                ax.legend(fontsize=6, loc="best")
        fig.subplots_adjust(wspace=0.25)
        return save_figure(fig, path)
