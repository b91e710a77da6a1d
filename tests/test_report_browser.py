"""The report in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
driven by Playwright. Rows, sorting, filters, search, a fact's heat maps drawn on click with values
on hover, kind toggles, the eval failures filter, no console errors, no network, no injected script.

Screenshots are saved under artifacts/report/ in the repository (listed in .gitignore; set
ROME_FAST_ARTIFACTS to put them elsewhere). Without a browser the tests skip, except under CI
(CI=true), where they fail: CI must run them."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from rome_fast.report import write_report
from rome_fast.report.browser import OpenedReport, find_chromium

from test_report import FACTS, XSS_IMG, XSS_SUBJECT, eval_run, tiny_llama, trace_run  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ROME_FAST_ARTIFACTS", ROOT / "artifacts")) / "report"
DATA_ROWS = "table.rf-data tbody tr"


def _no_browser(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs chromium and playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="session")  # session: resolved before the runs are built, so a skip is quick
def browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _no_browser("playwright is not installed (pip install playwright; no `playwright install` needed)")
    exe = find_chromium()
    if exe is None:
        _no_browser("no Chromium found (apt-get install chromium, or set ROME_FAST_CHROMIUM)")
    from rome_fast.report.browser import chromium
    with chromium(exe) as b:  # a browser that is there but does not start is a failure, not a skip
        yield b


@pytest.fixture
def opened(browser):
    pages = []

    def open_(path):
        r = OpenedReport(browser, path)
        pages.append(r)
        return r
    yield open_
    for r in pages:
        assert r.console_errors == [], r.console_errors
        assert r.dialogs == []  # no alert() from a subject or prompt
        assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in r.requests), r.requests
        # every trace drawn is of a type the inlined (partial) plotly.js bundle has
        missing = r.page.evaluate("""() => { const known = Plotly.PlotSchema.get().traces;
            return Array.from(document.querySelectorAll('.js-plotly-plot'))
                .flatMap(gd => gd.data.map(t => t.type || 'scatter')).filter(t => !(t in known)); }""")
        assert missing == [], missing
        r.close()


def shot(r, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    r.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def cells(page, scope, col):
    return page.evaluate("""([scope, col]) => Array.from(document.querySelectorAll(scope + ' table.rf-data tbody tr'))
        .map(tr => tr.children[col].textContent)""", [scope, col])


def header_index(page, scope, label):
    labels = page.locator(f"{scope} table.rf-data th").all_text_contents()
    return labels.index(label)


def test_trace_report(browser, opened, trace_run, tmp_path):
    out = write_report(trace_run, tmp_path / "trace.html")
    r = opened(out)
    page, scope = r.page, "section[data-run-type=trace]"
    rows = page.locator(f"{scope} {DATA_ROWS}")
    assert rows.count() == len(FACTS)
    assert page.locator(f"{scope} .rf-count").text_content() == f"{len(FACTS)} of {len(FACTS)} facts"
    # the injected subject is text in its cell, nothing more
    assert XSS_SUBJECT in cells(page, scope, 1)
    assert page.evaluate("document.scripts.length") == 3

    # the AIE figures: two plots, each kind toggled off and on
    assert page.locator(f"{scope} [data-figure] .main-svg").count() >= 2
    page.uncheck(f"{scope} input[data-kind-toggle=mlp]")
    hidden = page.evaluate("""() => Array.from(document.querySelectorAll('[data-figure]'))
        .flatMap(gd => gd.data.filter(t => t.meta === 'mlp').map(t => t.visible))""")
    assert hidden and all(v is False for v in hidden)
    page.check(f"{scope} input[data-kind-toggle=mlp]")

    # sorting: by the hidden-state effect, descending then ascending, blanks last
    col = header_index(page, scope, "hidden state effect")
    page.locator(f"{scope} table.rf-data th").nth(col).click()
    values = [float(v) for v in cells(page, scope, col) if v != "–"]
    assert values == sorted(values, reverse=True) and cells(page, scope, col)[-1] == "–"
    page.locator(f"{scope} table.rf-data th").nth(col).click()
    values = [float(v) for v in cells(page, scope, col) if v != "–"]
    assert values == sorted(values)

    # filters and search narrow the table
    page.select_option(f"{scope} .rf-toolbar select", "mispredicted")
    assert rows.count() == 1 and cells(page, scope, 0) == ["3"]
    page.select_option(f"{scope} .rf-toolbar select", "")
    page.fill(f"{scope} .rf-toolbar input[type=search]", "massif")
    assert rows.count() == 1 and cells(page, scope, 1) == ["Vinson Massif"]
    page.fill(f"{scope} .rf-toolbar input[type=search]", "owned by")  # the relation
    assert cells(page, scope, 1) == ["Beats Music"]
    page.fill(f"{scope} .rf-toolbar input[type=search]", "")
    assert rows.count() == len(FACTS)

    # click a fact: its three heat maps, drawn now, with the scores of its files
    page.locator(f"{scope} {DATA_ROWS}", has_text="Vinson Massif").click()
    page.wait_for_function("document.querySelector('.rf-detail[data-drawn]')")
    maps = page.locator(f"{scope} .rf-fact-heatmap.js-plotly-plot g.hm image")  # one raster per heat map
    assert maps.count() == 3
    z = page.evaluate("document.querySelector('.rf-fact-heatmap[data-kind=hidden]').data[0].z")
    from rome_fast.trace.results import TraceResult
    expect = TraceResult.load(trace_run / "cases" / "knowledge_0.npz").scores.numpy()
    np.testing.assert_allclose(np.array(z), expect, atol=2e-5)
    # hover a cell: Plotly shows its value
    drag = page.locator(f"{scope} .rf-fact-heatmap[data-kind=mlp] .nsewdrag")
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] - 5)  # the last token's row
    page.wait_for_selector(f"{scope} .rf-fact-heatmap[data-kind=mlp] .hoverlayer .hovertext")
    assert "p = " in page.locator(f"{scope} .rf-fact-heatmap[data-kind=mlp] .hoverlayer").text_content()
    shot(r, "trace.png")

    # the injected subject's heat maps: its tokens are labels, not markup
    page.locator(f"{scope} {DATA_ROWS}", has_text="alert(1)").click()
    page.wait_for_function("document.querySelector('.rf-detail').dataset.drawn === '4'")
    ticks = page.locator(f"{scope} .rf-fact-heatmap[data-kind=hidden] .ytick").all_text_contents()
    assert "".join(t.rstrip("*") for t in ticks).startswith(XSS_SUBJECT)


def test_tables_are_drawn_before_plotly_runs(browser, trace_run, tmp_path):
    """plotly.js, most of a load's CPU time, runs only once the facts table is on screen: at the
    moment it defines window.Plotly the rows are there, and the figures drawn afterwards do not
    move the table."""
    out = write_report(trace_run, tmp_path / "trace.html")
    table_top = "document.querySelector('table.rf-data').getBoundingClientRect().top + window.scrollY"
    r = OpenedReport(browser, out, init_script="""
        Object.defineProperty(window, 'Plotly', {configurable: true, set(v) {
            window.rfAtPlotly = {rows: document.querySelectorAll('table.rf-data tbody tr').length,
                                 top: %s, t: performance.now()};
            Object.defineProperty(window, 'Plotly', {value: v, writable: true, configurable: true});
        }});""" % table_top)
    try:
        at = r.page.evaluate("window.rfAtPlotly")
        t = r.timings()
        assert at["rows"] == len(FACTS)
        assert t["table"] < t["painted"] < at["t"] <= t["plotly"] < t["firstFigure"]
        assert r.page.locator("[data-figure] .main-svg").count() >= 2 and r.console_errors == []
        assert r.page.evaluate(table_top) == pytest.approx(at["top"], abs=1)
    finally:
        r.close()


def test_eval_report(browser, opened, eval_run, tmp_path):
    out = write_report(eval_run, tmp_path / "eval.html")
    r = opened(out)
    page, scope = r.page, "section[data-run-type=eval]"
    cases = [json.loads(p.read_text()) for p in eval_run.glob("case_*.json")]
    rows = page.locator(f"{scope} {DATA_ROWS}")
    assert rows.count() == len(cases)
    assert page.locator(f"{scope} table.rf-static").first.locator("td", has_text="±").count() > 0
    # the failures filter: cases whose rewrite prompt still prefers the true target
    failing = sorted(c["case_id"] for c in cases
                     if any(x["target_new"] >= x["target_true"] for x in c["post"]["rewrite_prompts_probs"]))
    assert 0 < len(failing) < len(cases)
    page.select_option(f"{scope} .rf-toolbar select", "not_applied")
    assert sorted(int(v) for v in cells(page, scope, 0)) == failing
    page.select_option(f"{scope} .rf-toolbar select", "any_failure")
    assert set(failing) <= {int(v) for v in cells(page, scope, 0)}
    page.select_option(f"{scope} .rf-toolbar select", "ok")
    assert not set(failing) & {int(v) for v in cells(page, scope, 0)}
    page.select_option(f"{scope} .rf-toolbar select", "")
    # sorting by a number
    col = header_index(page, scope, "P(new) post")
    page.locator(f"{scope} table.rf-data th").nth(col).click()
    values = [float(v) for v in cells(page, scope, col)]
    assert values == sorted(values, reverse=True)
    # a case's prompts, probabilities and generations
    page.locator(f"{scope} {DATA_ROWS}", has_text=XSS_IMG).click()
    detail = page.locator(f"{scope} .rf-detail")
    assert detail.get_attribute("data-case") == "99"
    assert detail.locator(".rf-texts li").count() == 4  # two generations before, two after
    assert page.evaluate("document.images.length") == 0  # the <img> subject stayed text
    # the collapse monitor: KL, entropy and one line per weight
    assert page.evaluate("document.querySelector('[data-figure=monitor]').data.length") == 4
    shot(r, "eval.png")


def test_demo_and_folder_of_runs(browser, opened, trace_run, eval_run, tmp_path):
    both = tmp_path / "both"
    demo = both / "demo"
    demo.mkdir(parents=True)
    for suffix in ("", "_mlp", "_attn"):
        shutil.copy(trace_run / "cases" / f"knowledge_1{suffix}.npz", demo / f"eiffel_tower{suffix}.npz")
    shutil.copytree(eval_run, both / "eval")
    out = write_report(both)
    assert out == both / "report.html"
    r = opened(out)
    page = r.page
    assert page.locator("section.rf-run").evaluate_all("s => s.map(x => x.dataset.runType)") == ["trace", "eval"]
    # one fact: its heat maps are shown without a click
    assert page.locator("section[data-run-type=trace] .rf-fact-heatmap g.hm image").count() == 3
    assert page.locator("section[data-run-type=eval] " + DATA_ROWS).count() == 4
    shot(r, "demo_and_eval.png")


def test_long_table_draws_rows_as_it_scrolls(browser, opened, tmp_path):
    """Rows are drawn 100 at a time; sorting and filtering still cover every fact."""
    import torch

    from rome_fast.trace.aggregate import case_path
    from rome_fast.trace.results import TraceResult
    rng = np.random.default_rng(0)
    n = 230
    for i in range(n):
        tokens = ["F", f"act{i}", " is", " in"]
        for kind in ("hidden", "mlp", "attn"):
            TraceResult(scores=torch.as_tensor(rng.uniform(0.1, 0.9, (4, 3)), dtype=torch.float32), low_score=0.1,
                        high_score=0.9, input_ids=torch.arange(4), input_tokens=tokens, subject_range=(0, 2),
                        answer=" X", window=10, kind="" if kind == "hidden" else kind,
                        ).save(case_path(tmp_path / "run" / "cases", i, kind))
    r = opened(write_report(tmp_path / "run"))
    page, scope = r.page, "section[data-run-type=trace]"
    rows = page.locator(f"{scope} {DATA_ROWS}")
    assert rows.count() == 100 and page.locator(f"{scope} .rf-count").text_content() == f"{n} of {n} facts"
    for expect in (200, n):
        page.locator(f"{scope} .rf-tablebox").evaluate("box => { box.scrollTop = box.scrollHeight; }")
        page.wait_for_function(f"document.querySelectorAll('{scope} {DATA_ROWS}').length === {expect}")
    col = header_index(page, scope, "MLP effect")
    page.locator(f"{scope} table.rf-data th").nth(col).click()
    assert rows.count() == 100
    effects = [float(v) for v in cells(page, scope, col)]
    best = max(float(TraceResult.load(case_path(tmp_path / "run" / "cases", i, "mlp")).scores.max()) - 0.1
               for i in range(n))
    assert effects[0] == pytest.approx(best, abs=1e-3) and effects == sorted(effects, reverse=True)
    page.fill(f"{scope} .rf-toolbar input[type=search]", "act22")  # act22, act220…act229
    assert rows.count() == 11
