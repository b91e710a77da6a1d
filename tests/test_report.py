"""`rome-fast report` without a browser: finding and reading real runs (a trace run and an eval run
on tiny models, the demo's layout, a folder holding both), the numbers the page is given, hostile
input (pickled npz, script in subjects), unknown metrics, and writing only to --out.
The page in a real browser: tests/test_report_browser.py (which uses these runs)."""
import json
import math
import re

import numpy as np
import pytest
import torch

from rome_fast.cli import main
from rome_fast.report import report_data, write_report
from rome_fast.report.page import plotly_js, script_json
from rome_fast.report.runs import find_runs

from cf_cases import COMPACT_CASES

XSS_SUBJECT = "</script><script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(2)>"
FACTS = [
    {"known_id": 0, "subject": "Vinson Massif", "prompt": "Vinson Massif is located in the continent of",
     "relation_id": "P30"},
    {"known_id": 1, "subject": "Beats Music", "prompt": "Beats Music is owned by", "relation_id": "P127"},
    {"known_id": 2, "subject": "Toyota", "prompt": "Toyota is headquartered in", "relation_id": "P159"},
    # the tiny model does not predict this: a mispredicted fact, stored without scores
    {"known_id": 3, "subject": "Miles Davis", "prompt": "Miles Davis plays the", "attribute": "trumpet"},
    {"known_id": 4, "subject": XSS_SUBJECT, "prompt": XSS_SUBJECT + " is located in", "relation_id": "P<b>1</b>"},
]
HOSTILE_CASE = dict(case_id=99, prompt=f"{XSS_IMG} is located in", subject=XSS_IMG,
                    target_new=XSS_SUBJECT, ground_truth="Paris", rephrase_prompt=f"Where is {XSS_IMG}? In",
                    locality_prompt="The Louvre is located in", locality_ground_truth="Paris")
MONITOR = {"probe_prompts": ["The capital of France is", "<b>probe</b>"],
           "batches": [{"batch": b, "edits": 10 * b,
                        "update_norm": {"model.layers.1.mlp.down_proj.weight": 0.5 * b,
                                        "model.layers.2.mlp.down_proj.weight": 0.4 * b},
                        "kl": 0.01 * 2 ** b, "ngram_entropy": 6.0 - 0.2 * b, "seconds": 1.5} for b in (1, 2, 3, 4)]}


@pytest.fixture(scope="session")
def tiny_llama():
    from rome_fast.models import ModelAndTokenizer
    from rome_fast.models.random_init import random_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = random_model("llama", seed=1)
    mt = ModelAndTokenizer(model=model, tokenizer=tok)
    mt.name = "tiny:llama"
    yield mt
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trace_run(tiny_llama, tmp_path_factory):
    """A real facts run of the tracer (fast engine, all three kinds) on a tiny Llama."""
    from rome_fast.trace.runner import trace_facts
    out = tmp_path_factory.mktemp("reports") / "trace"
    trace_facts(tiny_llama, FACTS, out, noise=0.1, samples=2, progress=False, figures=False)
    return out


class RankOne:
    """A fixed random rank-one change of one MLP output weight, undone by the returned function."""

    def __init__(self, mt):
        w = mt.adapter.rewrite_weight(1)
        g = torch.Generator().manual_seed(0)
        self.delta = 0.5 * torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g))

    def __call__(self, mt, request):
        w = mt.adapter.rewrite_weight(1)
        saved = w.detach().clone()
        with torch.no_grad():
            w += self.delta
        return lambda: w.data.copy_(saved)


@pytest.fixture(scope="session")
def eval_run(tiny_llama, tmp_path_factory):
    """A real eval run (CounterFact, generations on) of a rank-one editor on the tiny Llama, with a
    hostile case and a collapse-monitor log as a sequential run writes it."""
    from rome_fast.eval import datasets as D
    from rome_fast.eval import runner as R
    base = tmp_path_factory.mktemp("eval")
    data = base / "cf.json"
    data.write_text(json.dumps(COMPACT_CASES[:3] + [HOSTILE_CASE]))
    out = base / "eval"
    R.evaluate(tiny_llama, "counterfact", D.load_counterfact(data), None, out, editor=RankOne(tiny_llama),
               progress=False)
    (out / "monitor.json").write_text(json.dumps(MONITOR))
    return out


def run_of(data, kind):
    return next(r for r in data["runs"] if r["type"] == kind)


def column(run, key):
    i = [c["key"] for c in run["table"]["columns"]].index(key)
    return [row[i] for row in run["table"]["rows"]]


# ---- trace runs ---------------------------------------------------------------------------------

def test_trace_rows_match_the_case_files(trace_run):
    from rome_fast.trace.aggregate import case_path
    from rome_fast.trace.results import TraceResult
    data = report_data(trace_run)
    run = run_of(data, "trace")
    assert data["warnings"] == []
    assert column(run, "id") == [0, 1, 2, 3, 4]
    assert column(run, "subject") == [f["subject"] for f in FACTS[:3]] + ["", XSS_SUBJECT]
    for row, detail, fact in zip(run["table"]["rows"], run["details"], FACTS):
        for kind in ("hidden", "mlp", "attn"):
            r = TraceResult.load(case_path(trace_run / "cases", fact["known_id"], kind))
            layer, effect = (row[[c["key"] for c in run["table"]["columns"]].index(f"{kind}_{x}")]
                             for x in ("layer", "effect"))
            if not r.correct_prediction:
                assert layer is None and effect is None and detail["kinds"][kind]["mispredicted"] == r.answer.strip()
                continue
            scores = r.scores.numpy()
            t, best = np.unravel_index(scores.argmax(), scores.shape)
            assert layer == best and effect == pytest.approx(scores.max() - r.low_score, abs=1e-6)
            enc = detail["kinds"][kind]
            decoded = np.frombuffer(__import__("base64").b64decode(enc["scores"]), "<u2").reshape(enc["shape"])
            np.testing.assert_allclose(decoded / run["score_scale"], scores, atol=1 / run["score_scale"])
    assert run["table"]["flags"][3] == ["mispredicted"]
    assert column(run, "relation")[0] == "{} is located in the continent of"
    assert run["settings"]["model"] == "tiny:llama" and run["settings"]["samples"] == 2


def test_trace_averages_are_the_aggregates(trace_run):
    from rome_fast.trace.aggregate import aggregate_dir
    summary = aggregate_dir(trace_run, figures=False)  # the runner's own numbers (rewrites summary.json)
    run = run_of(report_data(trace_run), "trace")
    rows = {r[0]: r for r in run["summary"]["rows"]}
    for kind, name in (("hidden", "hidden state"), ("mlp", "MLP"), ("attn", "Attn")):
        s = summary[kind]
        assert rows[name][1] == f"{s['n_correct']} / {s['n_facts']}"
        assert rows[name][4] == pytest.approx(s["ate"], rel=1e-5)
        assert rows[name][5:7] == [pytest.approx(s["best_aie_last_subject_token"], rel=1e-5),
                                   s["best_aie_last_subject_token_layer"]]
        heat = run["figures"]["aie_heatmap"]
        trace = next(t for t in heat.data if t.meta == kind)
        np.testing.assert_allclose(np.array(trace.z, dtype=float),
                                   [s["buckets"][b]["aie"] for b in s["buckets"]], atol=1e-6)


def test_relation_ids_from_the_facts_file(trace_run, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    run = run_of(report_data(trace_run, facts=facts), "trace")
    assert column(run, "relation")[:2] == ["P30 {} is located in the continent of", "P127 {} is owned by"]
    assert column(run, "subject")[3] == "Miles Davis"  # named by the facts file, though mispredicted


# ---- eval runs ----------------------------------------------------------------------------------

def test_eval_rows_failures_and_summary(eval_run):
    data = report_data(eval_run)
    run = run_of(data, "eval")
    cases = [json.loads(p.read_text()) for p in sorted(eval_run.glob("case_*.json"), key=lambda p: int(p.stem[5:]))]
    assert column(run, "id") == [c["case_id"] for c in cases]
    assert column(run, "subject")[-1] == XSS_IMG and column(run, "new")[-1] == XSS_SUBJECT
    for c, flags, new_post in zip(cases, run["table"]["flags"], column(run, "new_post")):
        post, pre = c["post"], c["pre"]
        # the failures, from the raw NLLs (lower NLL = more probable)
        applied = all(r["target_new"] < r["target_true"] for r in post["rewrite_prompts_probs"])
        para = all(r["target_new"] < r["target_true"] for r in post["paraphrase_prompts_probs"])
        kept = [sum(r["target_true"] < r["target_new"] for r in x["neighborhood_prompts_probs"]) for x in (pre, post)]
        expect = (["not_applied"] if not applied else []) + (["paraphrase_failed"] if not para else []) + \
                 (["neighborhood_damaged"] if kept[1] < kept[0] else [])
        assert flags == (expect + ["any_failure"] if expect else ["ok"])
        assert new_post == pytest.approx(math.exp(-post["rewrite_prompts_probs"][0]["target_new"]), rel=1e-5)
    detail = run["details"][0]
    assert detail["texts"]["post"] == cases[0]["post"]["text"]
    summary = json.loads((eval_run / "summary.json").read_text())
    rows = {r[0]: r for r in run["summary"]["rows"]}
    assert rows["ES (%)"][2]["mean"] == pytest.approx(summary["post"]["ES"]["mean"])
    assert rows["S (%)"][1] == pytest.approx(summary["pre"]["S"])
    monitor = run["figures"]["monitor"]
    assert [list(t.y) for t in monitor.data[:2]] == [[b["kl"] for b in MONITOR["batches"]],
                                                     [b["ngram_entropy"] for b in MONITOR["batches"]]]
    assert list(monitor.data[0].x) == [10, 20, 30, 40] and len(monitor.data) == 4


def test_unknown_metrics_are_shown_not_fatal(tmp_path):
    """Case files and a summary of a runner this report does not know (teacher-forced accuracies of
    a MEMIT chunk run) and odd entries: numbers are shown, the rest is skipped or kept as text."""
    out = tmp_path / "memit"
    out.mkdir()
    rr = {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": {"str": "piano"},
          "target_true": {"str": "trumpet"}}
    for i, acc in enumerate(([True, True], [False, True])):
        (out / f"case_{i}.json").write_text(json.dumps({
            "case_id": i, "requested_rewrite": rr, "time": 1.0, "chunk": 7,
            "pre": {"rewrite_acc": [False, False], "neighborhood_acc": 1.0},
            "post": {"rewrite_acc": acc, "paraphrase_acc": 0.5, "neighborhood_acc": 1.0 - i, "note": "x"}}))
    (out / "case_2.json").write_text(json.dumps([1, 2]))  # not an object: skipped with a warning
    (out / "summary.json").write_text(json.dumps({
        "dataset": "counterfact", "n": 3, "post": {"rewrite_acc": {"mean": 75.0, "ci95": 5.0, "n": 2}, "S": 50.0},
        "pre": {"rewrite_acc": {"mean": 0.0, "ci95": 0.0, "n": 2}}, "chunks": [1, 2], "time": {"mean": 1.0}}))
    data = report_data(out)
    run = run_of(data, "eval")
    assert len(data["warnings"]) == 1 and "case_2.json" in data["warnings"][0]
    assert [c["key"] for c in run["table"]["columns"]][5:] == [
        "neighborhood_acc_pre", "neighborhood_acc_post", "paraphrase_acc_post", "rewrite_acc_post", "time", "failures"]
    assert column(run, "rewrite_acc_post") == [1.0, 0.5]
    assert run["table"]["flags"] == [["paraphrase_failed", "any_failure"],
                                     ["not_applied", "paraphrase_failed", "neighborhood_damaged", "any_failure"]]
    assert run["details"][0]["extra"] == {"chunk": 7}
    assert {r[0]: r[1:] for r in run["summary"]["rows"]}["rewrite_acc"][1]["mean"] == 75.0
    assert "summary.json covers 3 cases" in run["notes"][0]
    write_report(out)  # and the page is written


def test_eval_run_without_summary_is_summarized(eval_run, tmp_path):
    import shutil
    copy = tmp_path / "partial"
    shutil.copytree(eval_run, copy)
    (copy / "summary.json").unlink()
    run = run_of(report_data(copy), "eval")
    summary = json.loads((eval_run / "summary.json").read_text())
    rows = {r[0]: r for r in run["summary"]["rows"]}
    assert rows["PS (%)"][2]["mean"] == pytest.approx(summary["post"]["PS"]["mean"])
    assert "no summary.json" in run["notes"][0]


# ---- layouts ------------------------------------------------------------------------------------

def test_demo_layout_and_a_folder_of_runs(trace_run, eval_run, tmp_path):
    import shutil
    demo = tmp_path / "both" / "demo"
    demo.mkdir(parents=True)
    for kind, suffix in (("hidden", ""), ("mlp", "_mlp"), ("attn", "_attn")):
        shutil.copy(trace_run / "cases" / f"knowledge_0{suffix}.npz", demo / f"eiffel_tower{suffix}.npz")
    (demo / "summary.json").write_text(json.dumps({"noise": {"std": 0.4, "sigma": 0.13}}))
    (demo / "edit.json").write_text(json.dumps({
        "request": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                    "target_new": {"str": " Rome"}}, "layers": [5], "seconds": 1.0,
        "before": [{"prompt": "The Eiffel Tower is in", "completion": " Paris", "p(' Rome')": 0.01}],
        "after": [{"prompt": "The Eiffel Tower is in", "completion": " Rome", "p(' Rome')": 0.9}]}))
    shutil.copytree(eval_run, tmp_path / "both" / "eval")
    shutil.copytree(trace_run, tmp_path / "both" / "trace")
    runs = find_runs(tmp_path / "both")
    assert [(r.kind, r.label) for r in runs] == [("trace", "trace"), ("traces", "demo"), ("edit", "demo"),
                                                ("eval", "eval")]
    data = report_data(tmp_path / "both")
    single = data["runs"][1]
    assert column(single, "id") == ["eiffel_tower"] and single["settings"]["noise std"] == 0.4
    assert data["runs"][2]["probes"]["rows"] == [["The Eiffel Tower is in", " Paris", " Rome", 0.01, 0.9]]


def test_no_run_and_bad_out_are_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no run found" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path)]) == 2


def test_unwritable_out_is_a_one_line_error(eval_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["report", str(eval_run), "--out", str(blocker / "r.html")]) == 2
    assert "cannot write the report" in capsys.readouterr().err


# ---- hostile input ------------------------------------------------------------------------------

class Boom:
    """Unpickling this would create a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_npz_is_skipped_not_run(trace_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trace_run, run)
    marker = tmp_path / "PICKLE_RAN"
    with open(run / "cases" / "knowledge_7.npz", "wb") as f:
        np.savez(f, scores=np.array([Boom(marker)], dtype=object), correct_prediction=np.array(True))
    (run / "cases" / "knowledge_8.npz").write_bytes(b"not a zip file")
    data = report_data(run)
    assert not marker.exists()
    assert any("knowledge_7.npz" in w and "pickle" in w for w in data["warnings"])
    assert any("knowledge_8.npz" in w for w in data["warnings"])
    assert column(run_of(data, "trace"), "id") == [0, 1, 2, 3, 4]


def test_strings_cannot_close_the_script(trace_run, eval_run, tmp_path):
    text = script_json({"s": XSS_SUBJECT + "<!-- \u2028 &amp;"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"s": XSS_SUBJECT + "<!-- \u2028 &amp;"}
    for folder in (trace_run, eval_run):
        page = write_report(folder, tmp_path / f"{folder.name}.html").read_text()
        assert len(re.findall(r"<script", page, re.I)) == 3  # the data, plotly.js (inert text), the report's script
        data = page.split('<script type="application/json" id="rf-data">')[1].split("</script>")[0]
        assert "<" not in data and "alert(1)" in data  # there, but as escaped JSON text


def test_vendored_plotly_js_is_the_recorded_release(trace_run, eval_run, tmp_path):
    """The inlined plotly.js is the partial bundle its record names (version, sha256), of the same
    major release as the plotly.js of the Python package that builds the figures (a new major one
    may drop attributes the figures use: then update the bundle), with every trace type the report
    draws; the page inlines it, once, and says which it is."""
    import hashlib

    import plotly.offline
    library, record = plotly_js()
    assert hashlib.sha256(library.encode("utf-8")).hexdigest() == record["sha256"]
    version = re.compile(r"plotly\.js (?:\([^)]*\) )?v(\d+\.\d+\.\d+)")
    assert version.search(library[:300]).group(1) == record["version"]
    python_major = version.search(plotly.offline.get_plotlyjs()[:300]).group(1).split(".")[0]
    assert python_major == record["version"].split(".")[0]
    drawn = {"heatmap"}  # each fact's heat maps, drawn by the page's script
    for folder in (trace_run, eval_run):
        for run in report_data(folder)["runs"]:
            drawn |= {t.type for fig in run.get("figures", {}).values() for t in fig.data}
    assert drawn == {"heatmap", "scatter", "bar"} and drawn <= set(record["trace_types"])
    page = write_report(trace_run, tmp_path / "r.html").read_text()
    assert page.count(library) == 1 and f"plotly.js {record['version']}" in page


def test_plotly_labels_from_files_are_text(trace_run, tmp_path):
    """Plotly reads <b>, <a href> and entities in titles and ticks: names from files are escaped."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trace_run, run)
    settings = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**settings, "model": "<a href='https://x'>m</a>"}))
    (run / "eval").mkdir()
    (run / "eval" / "case_0.json").write_text(json.dumps({"case_id": 0, "post": {"<b>acc</b>": 1.0}}))
    (run / "eval" / "summary.json").write_text(json.dumps({"post": {"<b>acc</b>": {"mean": 50.0, "ci95": 1.0}}}))
    data = report_data(run)
    title = run_of(data, "trace")["figures"]["aie_heatmap"].layout.title.text
    assert title.endswith("&lt;a href='https://x'&gt;m&lt;/a&gt;")
    assert list(run_of(data, "eval")["figures"]["summary"].data[0].x) == ["&lt;b&gt;acc&lt;/b&gt;"]


def test_writes_only_the_out_file(trace_run, tmp_path):
    before = sorted(p.relative_to(trace_run) for p in trace_run.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in trace_run.rglob("*")}
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(trace_run), "--out", str(out)]) == 0
    assert out.is_file() and sorted(p.relative_to(trace_run) for p in trace_run.rglob("*")) == before
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temporary file left behind


def test_malformed_case_files_do_not_stop_the_report(tmp_path):
    out = tmp_path / "odd"
    out.mkdir()
    rr = {"prompt": "{:>99999999} {0.__class__} {}", "subject": "S", "target_new": "x"}
    (out / "case_0.json").write_text(json.dumps({"case_id": 0, "requested_rewrite": rr,
                                                 "post": {"rewrite_prompts_probs": "oops"}, "pre": 3}))
    (out / "case_1.json").write_text(json.dumps({"case_id": 1, "requested_rewrite": [1],
                                                 "post": {"rewrite_prompts_probs": [{"target_new": 1.0,
                                                                                     "target_true": 2.0}]}}))
    data = report_data(out)
    run = run_of(data, "eval")
    assert column(run, "prompt") == ["{:>99999999} {0.__class__} S", ""]  # shown, not formatted
    assert any("case 0 (post)" in w for w in data["warnings"])
    assert run["table"]["flags"] == [["ok"], ["ok"]] and column(run, "new_post") == [None, math.exp(-1.0)]
    assert "no summary.json" in run["notes"][0]


def test_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny:gpt2", "--kind", "hidden", "--samples", "2", "--no-edit",
                 "--out", str(out)]) == 0
    assert f"report (open it in a browser): {out / 'report.html'}" in capsys.readouterr().out
    run = run_of(report_data(out), "trace")
    assert column(run, "id") == ["eiffel_tower"] and column(run, "subject") == ["Eiffel Tower"]
    assert run["settings"]["noise std"] > 0
