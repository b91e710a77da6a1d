"""The report page: one HTML file holding its style, plotly.js, the report's own script and the data
(JSON, escaped so that no string in it can end the script element).

The plotly.js inlined is the vendored official "cartesian" partial bundle (assets/plotly-cartesian.*,
its version and sha256 in plotly-cartesian.json), not the full bundle of Plotly's Python package:
it has every trace type the report draws, in a third of the bytes and of the time to start. It sits
in the page as inert text, which report.js runs once the tables are on screen."""
from __future__ import annotations

import html
import json
import math
import sys
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .edit_view import edit_view
from .eval_view import eval_view
from .runs import Facts, Warnings, find_runs
from .trace_view import trace_view

# In JSON text these escapes are equivalent to the characters, and none of the characters then
# remains: "</script>" or "<!--" inside a string cannot close or confuse the script element.
_JSON_TABLE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                            "\u2029": "\\u2029"})


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


PLOTLY_JS = "plotly-cartesian"  # assets/PLOTLY_JS.min.js, .json (version, sha256), .LICENSE


@lru_cache(maxsize=1)
def plotly_js() -> tuple[str, dict]:
    """The plotly.js bundle the page inlines, and its record (package, version, sha256, ...)."""
    return _asset(f"{PLOTLY_JS}.min.js"), json.loads(_asset(f"{PLOTLY_JS}.json"))


def _plain(obj):
    """JSON-ready: figures as Plotly's JSON, numpy as Python, floats to 6 significant digits,
    NaN and infinities as null."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if hasattr(obj, "to_plotly_json"):
        import plotly.io
        return _plain(json.loads(plotly.io.to_json(obj, validate=False)))
    return str(obj)


def script_json(obj) -> str:
    """`obj` as JSON safe to place inside <script type="application/json">."""
    text = json.dumps(_plain(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.translate(_JSON_TABLE)


def _versions() -> dict:
    import plotly

    from .. import __version__
    return {"rome_fast": __version__, "plotly": plotly.__version__, "plotly.js": plotly_js()[1]["version"],
            "python": sys.version.split()[0]}


def report_data(run_dir, facts=None) -> dict:
    """Everything the page shows, as plain data: one entry per run found in `run_dir`."""
    warnings = Warnings()
    facts = Facts.from_file(facts) if facts else None
    views = []
    for run in find_runs(run_dir):
        if run.kind in ("trace", "traces"):
            views.append(trace_view(run, warnings, facts))
        elif run.kind == "eval":
            views.append(eval_view(run, warnings))
        elif run.kind == "edit":
            view = edit_view(run, warnings)
            if view is not None:
                views.append(view)
    return dict(runs=views, warnings=list(warnings), versions=_versions(),
                generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), source=Path(run_dir).name or str(run_dir))


def render_html(data: dict) -> str:
    library, record = plotly_js()
    v = data["versions"]
    title = f"rome-fast report: {data['source']}"
    meta = (f"made {data['generated']} by rome_fast {v['rome_fast']} with plotly {v['plotly']} "
            f"(plotly.js {record['version']}, {record['package']}), Python {v['python']}")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{html.escape(title)}</title><style>{_asset('report.css')}</style></head><body>",
        f"<header class=\"rf-top\"><h1>{html.escape(title)}</h1><div class=\"rf-meta\">{html.escape(meta)}</div>",
        "<nav class=\"rf-nav\" id=\"rf-nav\"></nav></header>",
        "<main id=\"rf-main\"><div class=\"rf-errors\" id=\"rf-errors\"></div>",
        "<noscript>This report needs JavaScript to draw its tables and figures.</noscript></main>",
        f"<script type=\"application/json\" id=\"rf-data\">{script_json(data)}</script>",
        f"<script type=\"text/plain\" id=\"rf-plotly\">{library}</script>",  # run by report.js
        f"<script>{_asset('report.js')}</script></body></html>\n"])


def write_report(run_dir, out=None, facts=None) -> Path:
    """Write the report of the runs in `run_dir` (a trace run, an eval run, the demo's folder, or a
    folder holding several) to `out` (default `run_dir/report.html`), atomically; returns its path.
    `facts`: the known-facts JSON the trace run used, to name relations by their ids."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {out / 'report.html'}")
    page = render_html(report_data(run_dir, facts))
    try:
        atomic_write(out, lambda f: f.write(page.encode("utf-8")))
    except OSError as exc:
        raise ValueError(f"cannot write the report to {out} ({exc.strerror}): pass --out FILE.html "
                         "in a folder you can write to") from None
    return out
