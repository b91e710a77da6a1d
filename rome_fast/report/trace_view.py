"""What the report shows of trace results: the facts table (one row per fact, the peak of each kind),
each fact's heat-map data (drawn in the browser on click), and the averaged AIE figures."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from ..trace.aggregate import BUCKETS, aggregate_results
from ..trace.kinds import get_kind
from ..trace.results import TraceResult
from .runs import KINDS, Facts, Warnings, plotly_text, read_json, read_single_traces, read_trace_cases

KIND_NAME = {k: get_kind(k).label for k in KINDS}  # hidden state, MLP, Attn
PEAK_PLACES = ("last subject token", "subject", "first after subject", "further", "last token")
SCORE_SCALE = 65535  # scores travel as uint16 p·65535: resolution 1.5e-5, 2 bytes a cell


def colorscale(kind: str) -> list:
    """The paper's colour map of a kind (Purples, Greens, Reds) as a Plotly colour scale."""
    import plotly.colors
    colors = getattr(plotly.colors.sequential, get_kind(kind).cmap)
    return [[i / (len(colors) - 1), c] for i, c in enumerate(colors)]


def encode_scores(scores) -> str:
    """tokens × layers probabilities as base64 of little-endian uint16 (p·65535, row-major)."""
    q = np.rint(np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0) * SCORE_SCALE).astype("<u2")
    return base64.b64encode(q.tobytes()).decode("ascii")


def peak_place(token: int, subject_range, n_tokens: int) -> str:
    """Where a token sits, in the buckets of the averaged figures (short names)."""
    fs, fa = subject_range
    if fs <= token < fa:
        return PEAK_PLACES[0] if token == fa - 1 else PEAK_PLACES[1]
    if token == n_tokens - 1:
        return PEAK_PLACES[4]
    return PEAK_PLACES[2] if token == fa else PEAK_PLACES[3]


def _subject_and_prompt(r: TraceResult, record: dict | None) -> tuple[str, str]:
    if record and record.get("subject") and record.get("prompt"):
        return str(record["subject"]), str(record["prompt"])
    tokens = r.input_tokens
    subject = "".join(tokens[r.subject_range[0]:r.subject_range[1]]).strip() if r.subject_range else ""
    return subject, "".join(tokens)


def _relation(subject: str, prompt: str, record: dict | None) -> str:
    template = prompt.replace(subject, "{}", 1) if subject else prompt
    rid = record.get("relation_id") if record else None
    return f"{rid} {template}" if rid else template


def fact_columns(kinds) -> list[dict]:
    cols = [dict(key="id", label="id", type="id"),
            dict(key="subject", label="subject", type="str", search=True),
            dict(key="relation", label="relation", type="str", search=True,
                 title="the prompt with the subject as {} (and the relation id when --facts names it)"),
            dict(key="answer", label="answer", type="str", title="the clean run's top token"),
            dict(key="clean", label="clean p", type="num", digits=3, title="p(answer), clean run"),
            dict(key="corrupted", label="corrupted p", type="num", digits=3,
                 title="p(answer) with the subject corrupted, nothing restored")]
    for k in kinds:
        name = KIND_NAME[k]
        cols += [dict(key=f"{k}_layer", label=f"{name} layer", type="int", kind=k,
                      title=f"layer of the strongest restoration of {name}"),
                 dict(key=f"{k}_effect", label=f"{name} effect", type="num", digits=3, kind=k,
                      title="peak restored p minus corrupted p"),
                 dict(key=f"{k}_place", label=f"{name} at", type="str", kind=k,
                      title="the token of the peak: subject, last subject token, …, last token")]
    return cols


def fact_row_and_detail(key: str, results: dict[str, TraceResult], kinds, record: dict | None):
    """(table row, flags, detail) of one fact traced for some kinds."""
    first = results.get("hidden") or next(iter(results.values()))
    subject, prompt = _subject_and_prompt(first, record)
    correct = [r for r in results.values() if r.correct_prediction]
    base = correct[0] if correct else first
    row = [int(key) if key.isdigit() else key, subject, _relation(subject, prompt, record),
           (base.answer or "").strip(), base.high_score, base.low_score if correct else None]
    flags = ["traced" if correct else "mispredicted"]
    detail = dict(id=row[0], subject=subject, prompt=prompt, answer=base.answer,
                  tokens=list(base.input_tokens), subject_range=list(base.subject_range or (0, 0)),
                  kinds={})
    for k in kinds:
        r = results.get(k)
        if r is None or not r.correct_prediction:
            row += [None, None, None]
            if r is not None:
                detail["kinds"][k] = dict(mispredicted=(r.answer or "").strip())
            continue
        t, layer, score = r.peak()
        place = peak_place(t, r.subject_range, len(r.input_tokens))
        row += [layer, score - r.low_score, place]
        flags.append(f"{k}:{place}")
        detail["kinds"][k] = dict(low=r.low_score, high=r.high_score, window=r.window,
                                  shape=list(r.scores.shape), scores=encode_scores(r.scores))
    return row, flags, detail


def fact_filters(kinds) -> list[list[str]]:
    out = [["traced", "correctly predicted (traced)"], ["mispredicted", "mispredicted (not traced)"]]
    for k in kinds:
        out += [[f"{k}:{p}", f"{KIND_NAME[k]} peak at the {p}"] for p in PEAK_PLACES]
    return out


# ---- averaged figures ---------------------------------------------------------------------------

def kind_summary_table(aggs: dict) -> dict:
    cols = [dict(label="kind", type="str"), dict(label="facts traced / read", type="str"),
            dict(label="mean clean p", type="num", digits=4), dict(label="mean corrupted p", type="num", digits=4),
            dict(label="ATE", type="num", digits=4, title="average total effect: clean − corrupted"),
            dict(label="best AIE, last subject token", type="num", digits=4), dict(label="layer", type="int"),
            dict(label="best AIE, last token", type="num", digits=4), dict(label="layer", type="int")]
    rows = []
    for k, a in aggs.items():
        s = a.summary()
        rows.append([KIND_NAME[k], f"{a.n_correct} / {a.n_facts}", a.high, a.low, a.ate,
                     s["best_aie_last_subject_token"], s["best_aie_last_subject_token_layer"],
                     s["best_aie_last_token"], s["best_aie_last_token_layer"]])
    return dict(columns=cols, rows=rows)


def aie_figures(aggs: dict, model: str | None) -> dict:
    """The two averaged figures of `trace.plots`, interactive: AIE heat maps (bucket × layer, one
    colour range for every kind) and AIE lines with 95 % bands. Traces carry meta=kind, so the page
    toggles a kind by restyling them. (Arrays go in as numpy: Plotly ships them as typed arrays, and
    an empty bucket's NaN is a gap.)"""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    kinds = list(aggs)
    titles = [f"AIE of {KIND_NAME[k]} ({aggs[k].n_correct} facts)" for k in kinds]
    vmax = max(float(np.nanmax(np.clip(a.aie, 0, None))) for a in aggs.values()) or 1e-9
    heat = make_subplots(rows=1, cols=len(kinds), subplot_titles=titles, horizontal_spacing=0.09)
    lines = make_subplots(rows=1, cols=len(kinds), subplot_titles=titles, shared_yaxes=True,
                          horizontal_spacing=0.04)
    for i, k in enumerate(kinds, 1):
        a = aggs[k]
        layers = list(range(a.aie.shape[1]))
        domain_end = heat.layout[f"xaxis{'' if i == 1 else i}"].domain[1]
        heat.add_trace(go.Heatmap(
            z=a.aie, x=layers, y=list(BUCKETS), customdata=a.ci95, zmin=0, zmax=vmax,
            colorscale=colorscale(k), meta=k, name=KIND_NAME[k],
            colorbar=dict(x=domain_end + 0.005, thickness=8, len=0.9),
            hovertemplate="%{y}<br>layer %{x}<br>AIE %{z:.4f} ± %{customdata:.4f}<extra>" + KIND_NAME[k] + "</extra>"),
            row=1, col=i)
        heat.update_xaxes(title_text=get_kind(k).aie_xlabel, row=1, col=i)
        heat.update_yaxes(autorange="reversed", showticklabels=i == 1, row=1, col=i)
        for j, bucket in enumerate(BUCKETS):
            if a.count[j] == 0:
                continue
            color = qualitative.Plotly[j]
            mean, ci = a.aie[j], np.nan_to_num(a.ci95[j])
            common = dict(legendgroup=bucket, meta=k, hoverinfo="skip", showlegend=False, line=dict(width=0))
            lines.add_trace(go.Scatter(x=layers, y=mean + ci, mode="lines", **common), row=1, col=i)
            lines.add_trace(go.Scatter(x=layers, y=mean - ci, mode="lines", fill="tonexty",
                                       fillcolor=_alpha(color, 0.15), **common), row=1, col=i)
            lines.add_trace(go.Scatter(
                x=layers, y=mean, mode="lines", name=bucket, legendgroup=bucket, meta=k,
                showlegend=i == 1, line=dict(color=color, width=1.5), customdata=a.ci95[j],
                hovertemplate="layer %{x}: AIE %{y:.4f} ± %{customdata:.4f}<extra>" + bucket + "</extra>"),
                row=1, col=i)
        lines.update_xaxes(title_text=get_kind(k).aie_xlabel, row=1, col=i)
    lines.update_yaxes(title_text="AIE (p)", row=1, col=1)
    suffix = f" — {plotly_text(model)}" if model else ""
    heat.update_layout(title=dict(text="Average indirect effect by token position" + suffix, x=0),
                       height=330, margin=dict(l=160, r=40, t=80, b=50), template="plotly_white")
    lines.update_layout(title=dict(text="Average indirect effect per layer, 95 % bands" + suffix, x=0),
                        height=380, margin=dict(l=60, r=20, t=80, b=50), template="plotly_white",
                        legend=dict(orientation="h", y=-0.25))
    return dict(aie_heatmap=heat, aie_lines=lines)


def _alpha(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


# ---- one run ------------------------------------------------------------------------------------

def trace_view(run, warnings: Warnings, facts: Facts | None = None) -> dict:
    """Page data of a facts run ("trace") or of loose one-fact results ("traces")."""
    folder = Path(run.path)
    if run.kind == "trace":
        groups = read_trace_cases(folder / "cases", warnings)
        settings = read_json(folder / "run.json", warnings) if (folder / "run.json").is_file() else None
    else:
        groups = read_single_traces(folder, warnings)
        demo = read_json(folder / "summary.json", warnings) if (folder / "summary.json").is_file() else None
        settings = {f"noise {k}": v for k, v in demo["noise"].items()} \
            if isinstance(demo, dict) and isinstance(demo.get("noise"), dict) else None
    kinds = [k for k in KINDS if any(k in g for g in groups.values())]
    rows, flags, details = [], [], []
    for key, results in groups.items():
        row, f, d = fact_row_and_detail(key, results, kinds, facts.by_id.get(key) if facts else None)
        rows.append(row)
        flags.append(f)
        details.append(d)
    aggs = {}
    for k in kinds:
        results = [g[k] for g in groups.values() if k in g]
        if run.kind == "trace" and any(r.correct_prediction for r in results):
            aggs[k] = aggregate_results(results, k)
    model = (settings or {}).get("model") if isinstance(settings, dict) else None
    n_layers = next((d["kinds"][k]["shape"][1] for d in details for k in d["kinds"] if "shape" in d["kinds"][k]),
                    None)
    facts_info = {"facts": len(rows), "kinds": ", ".join(kinds), "layers": n_layers}
    if run.kind == "trace":  # asked for by users; older runs' run.json lacks them
        settings = {"backend": "not recorded", "versions": "not recorded",
                    **(settings if isinstance(settings, dict) else {})}
    return dict(
        type="trace", label=run.label, title="Causal traces" if run.kind == "traces" else "Causal tracing run",
        settings={**facts_info, **(settings if isinstance(settings, dict) else {})},
        kinds=[dict(key=k, name=KIND_NAME[k], colorscale=colorscale(k), xlabel=get_kind(k).aie_xlabel) for k in kinds],
        summary=kind_summary_table(aggs) if aggs else None,
        figures=aie_figures(aggs, model) if aggs else {},
        table=dict(columns=fact_columns(kinds), rows=rows, flags=flags, filters=fact_filters(kinds),
                   noun="facts"),
        details=details, score_scale=SCORE_SCALE)
