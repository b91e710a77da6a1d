"""The report at the scale of known_1000: 1,209 facts × 3 kinds, in headless Chromium.

Writes a synthetic trace run (random but realistically shaped scores: 8–15 tokens × 30 layers, a
few mispredicted facts) with `TraceResult.save`, builds its report, and loads it several times in
a fresh page: the time to interactive (navigation start → facts table rendered and first figure
drawn), when the table is on screen, the time to draw a fact's three heat maps on click, and to
sort and search the table. In turn with it, in the same browser: the reference, the same report
with the full plotly.js of Plotly's Python package in place of the partial bundle it inlines, and
as a floor a page holding nothing but that partial bundle.

    .venv/bin/python benchmarks/report_scale.py            # -> benchmarks/results/report_scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rome_fast.report import write_report  # noqa: E402
from rome_fast.report.browser import OpenedReport, chromium  # noqa: E402
from rome_fast.report.page import plotly_js  # noqa: E402
from rome_fast.trace.aggregate import case_path  # noqa: E402
from rome_fast.trace.results import TraceResult  # noqa: E402

WORDS = ("Vinson", "Massif", "Beats", "Music", "Audible", "Catalonia", "Michael", "Jordan", "Toyota",
         "Miles", "Davis", "Eiffel", "Tower", "Louvre", "Nile", "Brazil", "Berlin", "Google", "Nintendo")
RELATIONS = (["is", "located", "in"], ["is", "owned", "by"], ["was", "created", "by"],
             ["plays", "the"], ["is", "a", "citizen", "of"], ["speaks", "the", "language"])


def synthetic_run(out: Path, n_facts: int, n_layers: int = 30, seed: int = 0, mispredicted: float = 0.03):
    """A trace facts run folder with random scores shaped like real ones: hidden states peak at the
    last subject token in early layers and at the last token late; MLPs at the last subject token
    in the middle; attention at the last token late."""
    rng = np.random.default_rng(seed)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(dict(
        model="synthetic (random scores)", noise_rule="s3", noise_level=0.1347, uniform_noise=False,
        samples=10, window=10, replace=False)))
    layers = np.arange(n_layers)
    for i in range(n_facts):
        subject = [" " + w for w in rng.choice(WORDS, size=rng.integers(1, 4))]
        subject = [t for w in subject for t in ([w] if rng.random() < 0.6 else [w[:3], w[3:]])]
        relation = [" " + w for w in RELATIONS[rng.integers(len(RELATIONS))]]
        tokens = (["The"] if rng.random() < 0.3 else []) + subject + relation
        tokens = tokens[:15] + [" of"] * max(0, 8 - len(tokens))
        fs = 1 if tokens[0] == "The" else 0
        fa = min(fs + len(subject), len(tokens) - 1)
        n = len(tokens)
        high, low = float(rng.uniform(0.05, 0.9)), 0.0
        low = float(high * rng.uniform(0.01, 0.4))
        base = dict(input_ids=torch.as_tensor(rng.integers(0, 50000, n)), input_tokens=tokens,
                    answer=" Paris", window=10, high_score=high)
        if rng.random() < mispredicted:
            for kind in ("hidden", "mlp", "attn"):
                TraceResult(correct_prediction=False, kind="" if kind == "hidden" else kind, **base).save(
                    case_path(out / "cases", i, kind))
            continue
        shapes = {"hidden": [(fa - 1, np.exp(-layers / 8)), (n - 1, 1 / (1 + np.exp(-(layers - 18) / 2)))],
                  "mlp": [(fa - 1, np.exp(-((layers - 8) / 5) ** 2))],
                  "attn": [(n - 1, np.exp(-((layers - 20) / 4) ** 2))]}
        for kind, bumps in shapes.items():
            s = np.full((n, n_layers), low) + rng.uniform(0, 0.05, (n, n_layers)) * (high - low)
            for row, curve in bumps:
                s[row] += (high - low) * rng.uniform(0.4, 1.0) * curve
            s = np.clip(s, 0, 1).astype(np.float32)
            TraceResult(scores=torch.from_numpy(s), low_score=low, subject_range=(fs, fa),
                        kind="" if kind == "hidden" else kind, **base).save(case_path(out / "cases", i, kind))


def plotly_only_page(path: Path) -> None:
    """The floor: a page with the report's plotly.js alone, marking ready once it has run."""
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    f"<script>{plotly_js()[0]}</script>"
                    "<script>window.rfReport = {ready: true, errors: [], timings: {script: performance.now()}};"
                    "</script></body></html>")


def measure(browser, path: Path, interact: bool) -> dict:
    """One fresh load of `path`: its timings and CPU times, and with `interact` the table's."""
    r = OpenedReport(browser, path, timeout_ms=120000)
    t = {**r.timings(), **r.cpu_ms()}
    if interact:
        if r.console_errors:
            raise RuntimeError(f"the page logged errors: {r.console_errors}")
        t["rows"] = r.page.locator("section[data-run-type=trace] table.rf-data tbody tr").count()
        t["ready"] = max(t["table"], t["firstFigure"])  # time to interactive
        t.update(r.page.evaluate("""async () => {
            const table = window.rfReport.tables[0], out = {};
            let t0 = performance.now();
            await table.select(table.spec.rows.length >> 1);
            out.click_heatmaps_ms = performance.now() - t0;
            const col = table.spec.columns.findIndex(c => c.key === 'mlp_effect');
            t0 = performance.now(); table.sortBy(col); out.sort_ms = performance.now() - t0;
            t0 = performance.now(); table.search.value = 'tower';
            table.search.dispatchEvent(new Event('input')); out.search_ms = performance.now() - t0;
            out.search_rows = table.body.children.length;
            return out;
        }"""))
    r.close()
    return t


def median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 1)


def full_bundle_page(report: Path, path: Path) -> None:
    """The reference: the same report with the full plotly.js of Plotly's Python package (what the
    report inlined before) in place of the partial bundle."""
    import plotly.offline
    page, partial = report.read_text(encoding="utf-8"), plotly_js()[0]
    assert page.count(partial) == 1
    path.write_text(page.replace(partial, plotly.offline.get_plotlyjs()), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=1209)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--loads", type=int, default=7, help="page loads of each page to take the median of")
    ap.add_argument("--keep", help="write the synthetic run and its report here (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report_scale.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp) / "run"
        t0 = time.perf_counter()
        synthetic_run(folder, args.facts, args.layers)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = write_report(folder)
        build_s = time.perf_counter() - t0
        reference_page = Path(tmp) / "full_plotly_js.html"
        full_bundle_page(report, reference_page)
        floor_page = Path(tmp) / "plotly_only.html"
        plotly_only_page(floor_page)
        load_before = os.getloadavg()[0]
        with chromium() as browser:
            version = browser.version
            runs, reference, floor = [], [], []
            for _ in range(args.loads):  # interleaved: all pages see the same machine
                runs.append(measure(browser, report, interact=True))
                reference.append(measure(browser, reference_page, interact=True))
                floor.append(measure(browser, floor_page, interact=False))
        load_after = os.getloadavg()[0]
        size, reference_size, floor_size = (f.stat().st_size for f in (report, reference_page, floor_page))
    import plotly
    record = plotly_js()[1]

    def summary(rs: list[dict]) -> dict:
        return dict(time_to_interactive=median(rs, "ready"), table_rendered=median(rs, "table"),
                    table_on_screen=median(rs, "painted"), plotly_js_ran=median(rs, "plotly"),
                    first_figure=median(rs, "firstFigure"), all_figures=median(rs, "allFigures"),
                    script_start=median(rs, "script"), click_to_heatmaps=median(rs, "click_heatmaps_ms"),
                    sort=median(rs, "sort_ms"), search=median(rs, "search_ms"),
                    main_thread_cpu_until_ready=median(rs, "main_thread_cpu_ms"),
                    renderer_cpu_until_ready=median(rs, "renderer_cpu_ms"))

    result = dict(
        what=f"rome-fast report of a synthetic trace run: {args.facts} facts x 3 kinds, "
             f"8-15 tokens x {args.layers} layers",
        machine=f"shared {os.cpu_count()}-core CPU machine ({platform.machine()}), other jobs running: "
                f"load average {load_before:.1f} before the page loads, {load_after:.1f} after",
        chromium=version, plotly=plotly.__version__, plotly_js=f"{record['package']} {record['version']}",
        python=platform.python_version(), loads=args.loads, rows_rendered=runs[0]["rows"],
        file_mb=round(size / 2**20, 2), plotly_js_mb=round(floor_size / 2**20, 2),
        data_mb=round((size - floor_size) / 2**20, 2), reference_file_mb=round(reference_size / 2**20, 2),
        write_cases_s=round(write_s, 1), build_report_s=round(build_s, 1),
        median_ms=summary(runs),
        reference_median_ms=summary(reference),
        plotly_only_page_median_ms=dict(plotly_js_ran=median(floor, "script"),
                                        main_thread_cpu=median(floor, "main_thread_cpu_ms")),
        report_over_reference=dict(
            time_to_interactive=round(median(runs, "ready") / median(reference, "ready"), 2),
            main_thread_cpu=round(median(runs, "main_thread_cpu_ms") / median(reference, "main_thread_cpu_ms"), 2)),
        report_over_plotly_only=dict(wall=round(median(runs, "ready") / median(floor, "script"), 2),
                                     main_thread_cpu=round(median(runs, "main_thread_cpu_ms")
                                                           / median(floor, "main_thread_cpu_ms"), 2)),
        note=("times in ms from navigation start, medians of fresh page loads in one browser; "
              "time_to_interactive = facts table rendered and first figure drawn; table_on_screen = the "
              "first moment after the table was painted (a frame has passed; sorting, search and filters "
              "work from here); plotly_js_ran = plotly.js has run (it runs after table_on_screen); "
              "reference = the same report with the full plotly.js of Plotly's Python package instead of "
              "the partial bundle, loaded in turn with it; plotly_only_page = the partial bundle alone in a "
              "page, also in turn: the floor of any page that inlines it. cpu_until_ready = CPU time of the "
              "page's main thread and renderer process until all figures are drawn (Chrome's ThreadTime, "
              "ProcessTime): close to what the load takes on an idle machine, while the wall times include "
              "waiting for the CPU. Taken on a shared machine: other jobs slow every wall time."),
        runs=[{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
        reference_runs=[{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in reference])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("runs")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
