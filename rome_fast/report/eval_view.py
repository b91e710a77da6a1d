"""What the report shows of an eval run: the summary with 95 % intervals, one row per case with
its failures flagged, each case's prompts' probabilities and generations, and the collapse
monitor's curves of a sequential run. Metrics it does not know (other runners' additions) are
shown as they are, never an error."""
from __future__ import annotations

import math
from pathlib import Path

from ..eval import metrics as M
from .runs import Warnings, is_number as _num, plotly_text, read_eval_cases, read_json

PHASES = ("pre", "post")
METRIC_ORDER = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "essence",
                "Efficacy", "Paraphrase", "Specificity")
PERCENT = {"S", "ES", "PS", "NS", "EM", "PM", "NM", "Efficacy", "Paraphrase", "Specificity"}
GROUPS = ("rewrite", "paraphrase", "neighborhood", "attribute")
# The first metric present of each tuple decides a failure (CounterFact, zsRE, teacher-forced acc).
EFFICACY = ("ES", "Efficacy", "rewrite_acc")
PARAPHRASE = ("PS", "Paraphrase", "paraphrase_acc")
NEIGHBOURHOOD = ("NS", "Specificity", "neighborhood_acc")
FAILURES = (("not_applied", "edit not applied",
             "the rewrite prompt does not prefer the new target after the edit (efficacy < 100 %)"),
            ("paraphrase_failed", "paraphrase failed",
             "some paraphrase does not prefer the new target after the edit (paraphrase score < 100 %)"),
            ("neighborhood_damaged", "neighbourhood damaged",
             "fewer neighbourhood prompts keep their true target after the edit than before"))
KNOWN_CASE_KEYS = {f"{g}_prompts_{s}" for g in GROUPS for s in ("probs", "correct")} | {
    "ngram_entropy", "reference_score", "essence_score", "text", "essence_text"}
MAX_TEXT = 2000  # characters kept of each generation


def _generic_metrics(phase: dict) -> dict:
    """Numbers (and the mean of number / boolean lists) under keys the known metrics do not use."""
    out = {}
    for k, v in phase.items():
        if k in KNOWN_CASE_KEYS:
            continue
        if _num(v):
            out[k] = float(v)
        elif isinstance(v, list) and v and all(isinstance(x, (bool, int, float)) for x in v):
            out[k] = sum(float(x) for x in v) / len(v)
    return out


def phase_scores(phase, where: str = "", warnings: Warnings | None = None) -> dict:
    """Per-case scores of one phase: the known ones (fractions; GE in nats) and any other numbers.
    Known entries of the wrong shape are left out, with a warning."""
    if not isinstance(phase, dict):
        return {}
    out = {}
    try:
        if any(f"{g}_prompts_probs" in phase for g in GROUPS):
            out.update(M.counterfact_case_scores(phase))
        if any(f"{g}_prompts_correct" in phase for g in GROUPS):
            out.update(M.zsre_case_scores(phase))
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        out = {}
        if warnings is not None:
            warnings.add(where, f"probabilities or accuracies of an unexpected shape ({exc!r})")
    out.update(_generic_metrics(phase))
    return out


def _prob(nll) -> float | None:
    return math.exp(-nll) if _num(nll) else None


def _first(scores: dict, names) -> float | None:
    return next((scores[n] for n in names if n in scores), None)


def case_failures(pre: dict, post: dict) -> list[str]:
    out = []
    eff, par = _first(post, EFFICACY), _first(post, PARAPHRASE)
    if eff is not None and eff < 1:
        out.append("not_applied")
    if par is not None and par < 1:
        out.append("paraphrase_failed")
    name = next((n for n in NEIGHBOURHOOD if n in post and n in pre), None)
    if name is not None and post[name] < pre[name]:
        out.append("neighborhood_damaged")
    return out


def _request(case: dict) -> dict:
    rr = case.get("requested_rewrite")
    rr = rr if isinstance(rr, dict) else {}
    subject, prompt = str(rr.get("subject", "")), str(rr.get("prompt", ""))

    def target(key):
        t = rr.get(key)
        return str(t.get("str", "")) if isinstance(t, dict) else ("" if t is None else str(t))
    filled = prompt.replace("{}", subject)  # not str.format: a prompt read from a file is no format string
    return dict(subject=subject, prompt=filled, target_true=target("target_true"), target_new=target("target_new"))


def _group_probs(case: dict) -> list[dict]:
    """Per prompt of each group: P(new) and P(true) before and after (exp of the mean NLL)."""
    out = []
    for g in GROUPS:
        rows = {p: (case.get(p) or {}).get(f"{g}_prompts_probs") if isinstance(case.get(p), dict) else None
                for p in PHASES}
        n = max((len(r) for r in rows.values() if isinstance(r, list)), default=0)
        for i in range(n):
            item = dict(group=g, index=i + 1)
            for p, r in rows.items():
                cell = r[i] if isinstance(r, list) and i < len(r) and isinstance(r[i], dict) else {}
                item[f"new_{p}"] = _prob(cell.get("target_new"))
                item[f"true_{p}"] = _prob(cell.get("target_true"))
            out.append(item)
    return out


def _texts(phase) -> list[str]:
    t = phase.get("text") if isinstance(phase, dict) else None
    return [str(x)[:MAX_TEXT] for x in t] if isinstance(t, list) else []


def _ordered(names) -> list[str]:
    names = set(names)
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def score_cases(cases: list[dict], warnings: Warnings | None = None) -> list[dict]:
    """{phase: scores} of each case."""
    return [{p: phase_scores(c.get(p), f"case {c.get('case_id')} ({p})", warnings) for p in PHASES}
            for c in cases]


def case_table(cases: list[dict], scored: list[dict]) -> tuple[dict, list[dict]]:
    """The cases table (one row per case) and each case's detail."""
    metrics = _ordered({m for s in scored for m in s["post"]} - {"EM", "PM", "NM", "essence"})
    neighbour = [m for m in NEIGHBOURHOOD if any(m in s["pre"] for s in scored)]
    has_probs = any(isinstance(c.get("post"), dict) and "rewrite_prompts_probs" in c["post"] for c in cases)
    sequential = any("edits" in c for c in cases)
    cols = [dict(key="id", label="case", type="id"),
            dict(key="subject", label="subject", type="str", search=True),
            dict(key="prompt", label="prompt", type="str", search=True),
            dict(key="true", label="true target", type="str", search=True),
            dict(key="new", label="new target", type="str", search=True)]
    if has_probs:
        cols += [dict(key=f"{t}_{p}", label=f"P({t}) {p}", type="num", digits=3,
                      title=f"probability of the {t} target after the rewrite prompt, {p}-edit")
                 for t in ("new", "true") for p in PHASES]
    cols += [dict(key=f"{m}_pre", label=f"{m} pre", type="num", digits=2) for m in neighbour]
    cols += [dict(key=f"{m}_post", label=f"{m} post", type="num", digits=2) for m in metrics]
    if sequential:
        cols.append(dict(key="edits", label="edits", type="int", title="edits applied so far (sequential run)"))
    cols += [dict(key="time", label="edit s", type="num", digits=2),
             dict(key="failures", label="failures", type="str")]
    labels = {k: label for k, label, _ in FAILURES}
    rows, flags, details = [], [], []
    for c, s in zip(cases, scored):
        req = _request(c)
        probs = _group_probs(c)
        first = next((p for p in probs if p["group"] == "rewrite"), {})
        fails = case_failures(s["pre"], s["post"])
        row = [c.get("case_id"), req["subject"], req["prompt"], req["target_true"], req["target_new"]]
        if has_probs:
            row += [first.get(f"{t}_{p}") for t in ("new", "true") for p in PHASES]
        row += [s["pre"].get(m) for m in neighbour]
        row += [s["post"].get(m) for m in metrics]
        if sequential:
            row.append(c.get("edits") if _num(c.get("edits")) else None)
        row += [c.get("time") if _num(c.get("time")) else None, ", ".join(labels[f] for f in fails)]
        rows.append(row)
        flags.append(fails or ["ok"])
        all_metrics = _ordered(set(s["pre"]) | set(s["post"]))
        extra = {k: v for k, v in c.items()
                 if k not in ("case_id", "requested_rewrite", "time", "edits", "pre", "post")}
        details.append(dict(id=c.get("case_id"), request=req, probs=probs,
                            metrics=[[m, s["pre"].get(m), s["post"].get(m)] for m in all_metrics],
                            texts={p: _texts(c.get(p)) for p in PHASES}, extra=extra))
    filters = [["ok", "no failure"], ["any_failure", "any failure"]] + [[k, label] for k, label, _ in FAILURES]
    for f in flags:
        if f != ["ok"]:
            f.append("any_failure")
    return dict(columns=cols, rows=rows, flags=flags, filters=filters, noun="cases",
                legend=[[label, why] for _, label, why in FAILURES]), details


# ---- summary ------------------------------------------------------------------------------------

def _metric_like(v) -> bool:
    return _num(v) or (isinstance(v, dict) and "mean" in v)


def summary_table(summary: dict) -> dict | None:
    """Rows: metrics; columns: the phases (pre, post, and any other phase-like entry); cells are
    {mean, ci95, n} or a number. Top-level metrics (the edit time) are rows of their own."""
    phases = [k for k, v in summary.items() if isinstance(v, dict) and v and "mean" not in v
              and all(_metric_like(x) for x in v.values())]
    phases = [p for p in PHASES if p in phases] + [p for p in phases if p not in PHASES]
    if not phases:
        return None
    names = _ordered({m for p in phases for m in summary[p]})
    rows = [[m + (" (%)" if m in PERCENT else "")] + [summary[p].get(m) for p in phases] for m in names]
    note = "mean ± 95 % interval half-width (n cases)" + (
        "; S is the harmonic mean of ES, PS and NS." if "S" in names else ".")
    for k, v in summary.items():  # metrics of the run rather than of a phase: the edit time
        if isinstance(v, dict) and _num(v.get("mean")):
            ci = f" ± {v['ci95']:.2f}" if _num(v.get("ci95")) else ""
            note += f" {'edit time' if k == 'time' else k}: {v['mean']:.2f}{ci}{' s per case' if k == 'time' else ''}."
    return dict(columns=[dict(label="metric", type="str")] + [dict(label=p, type="ci") for p in phases],
                rows=rows, note=note)


def summary_figure(summary: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for p in PHASES:
        phase = summary.get(p)
        if not isinstance(phase, dict):
            continue
        names = [m for m in _ordered(phase) if m in PERCENT or (isinstance(phase[m], dict) and _num(
            phase[m].get("mean")) and abs(phase[m]["mean"]) <= 100 and m not in METRIC_ORDER)]
        ys = [phase[m]["mean"] if isinstance(phase[m], dict) else phase[m] for m in names]
        ci = [phase[m].get("ci95") if isinstance(phase[m], dict) else 0 for m in names]
        fig.add_trace(go.Bar(name=p, x=[plotly_text(m) for m in names], y=[y if _num(y) else None for y in ys],
                             error_y=dict(type="data", array=[c if _num(c) else 0 for c in ci]),
                             hovertemplate="%{x} " + p + ": %{y:.1f} ± %{error_y.array:.1f}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_layout(title=dict(text="Scores before and after the edit (mean, 95 % interval)", x=0),
                      barmode="group", height=340, template="plotly_white", yaxis_title="%",
                      margin=dict(l=50, r=20, t=60, b=40))
    return fig


def summarize_cases(cases: list[dict], scored: list[dict]) -> dict:
    """The summary of `eval.runner.summarize`, computed in memory (for a run without summary.json)
    from the cases' scores (`score_cases`)."""
    zsre = any("Efficacy" in s["post"] for s in scored)
    out = {"dataset": "zsre" if zsre else "counterfact", "n": len(cases)}
    for p in PHASES:
        out[p] = M.aggregate([s[p] for s in scored], M.ZSRE_KEYS if zsre else M.CF_KEYS)
    times = [c["time"] for c in cases if _num(c.get("time"))]
    if times:
        out["time"] = M.mean_std_ci(times, scale=1.0)
    return out


# ---- collapse monitor ---------------------------------------------------------------------------

def monitor_figure(monitor, path, warnings: Warnings):
    """KL to the original model, n-gram entropy and the update norm per weight against the number
    of edits, from a sequential run's monitor.json."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    batches = monitor.get("batches") if isinstance(monitor, dict) else None
    if not isinstance(batches, list) or not all(isinstance(b, dict) for b in batches):
        warnings.add(path, "expected {\"batches\": [{\"edits\", \"kl\", \"ngram_entropy\", \"update_norm\"}, ...]}")
        return None
    x = [b.get("edits", b.get("batch")) for b in batches]
    x = [v if _num(v) else None for v in x]
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "KL(edited ‖ original) on probe prompts", "n-gram entropy of generations", "update norm per weight"),
        horizontal_spacing=0.07)
    for col, key in ((1, "kl"), (2, "ngram_entropy")):
        y = [b.get(key) if _num(b.get(key)) else None for b in batches]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=key, showlegend=False,
                                 hovertemplate="%{x} edits: %{y:.4g}<extra>" + key + "</extra>"), row=1, col=col)
    names = sorted({n for b in batches if isinstance(b.get("update_norm"), dict) for n in b["update_norm"]})
    for n in names:
        y = [b["update_norm"].get(n) if isinstance(b.get("update_norm"), dict) and _num(b["update_norm"].get(n))
             else None for b in batches]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=plotly_text(n), legendgroup="norm",
                                 hovertemplate="%{x} edits: %{y:.4g}<extra>%{fullData.name}</extra>"), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="edits", row=1, col=col)
    probes = monitor.get("probe_prompts")
    fig.update_layout(title=dict(text=f"Collapse monitor ({len(batches)} batches"
                                 + (f", {len(probes)} probe prompts)" if isinstance(probes, list) else ")"), x=0),
                      height=360, template="plotly_white", margin=dict(l=50, r=20, t=70, b=50),
                      legend=dict(orientation="h", y=-0.3))
    return fig


# ---- one run ------------------------------------------------------------------------------------

def eval_view(run, warnings: Warnings) -> dict:
    folder = Path(run.path)
    cases = read_eval_cases(folder, warnings)
    config = read_json(folder / "run.json", warnings) if (folder / "run.json").is_file() else None
    summary = read_json(folder / "summary.json", warnings) if (folder / "summary.json").is_file() else None
    notes = []
    scored = score_cases(cases, warnings)
    if not isinstance(summary, dict):
        summary = summarize_cases(cases, scored) if cases else {}
        notes.append("summary computed from the case files (the run has no summary.json yet)")
    elif _num(summary.get("n")) and summary["n"] != len(cases):
        notes.append(f"summary.json covers {summary['n']} cases; the folder holds {len(cases)} readable "
                     "case files (rerun `rome-fast eval-summary` to update it)")
    table, details = case_table(cases, scored)
    figures = {}
    bars = summary_figure(summary)
    if bars is not None:
        figures["summary"] = bars
    if (folder / "monitor.json").is_file():
        monitor = read_json(folder / "monitor.json", warnings)
        if monitor is not None:
            fig = monitor_figure(monitor, folder / "monitor.json", warnings)
            if fig is not None:
                figures["monitor"] = fig
    settings = {k: v for k, v in (config if isinstance(config, dict) else {}).items()}
    for k in ("dataset", "n", "model"):
        if k in summary and k not in settings:
            settings[k] = summary[k]
    settings["cases read"] = len(cases)
    if isinstance(summary.get("notes"), dict):
        notes += [f"{k}: {v}" for k, v in summary["notes"].items()]
    return dict(type="eval", label=run.label, title="Edit evaluation", settings=settings,
                summary=summary_table(summary), notes=notes, figures=figures, table=table, details=details)
