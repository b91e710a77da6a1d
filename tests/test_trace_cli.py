"""`rome-fast trace` and `rome-fast demo` on tiny random models: files, resuming, interruption."""
import json

import numpy as np
import pytest

from rome_fast.cli import main
from rome_fast.trace import runner

PROMPTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
           ("Miles Davis plays the", "Miles Davis"),
           ("The Louvre is a museum in", "The Louvre"),
           ("Toyota is headquartered in", "Toyota")]
ARGS = ["--model", "tiny:gpt2", "--samples", "2", "--no-progress", "--backend", "reference"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def facts_file(make_facts_file):
    """The second fact is mispredicted (skipped as the reference skips it)."""
    return make_facts_file("tiny:gpt2", PROMPTS, wrong={1}, first_id=10)


def _cases(out):
    return sorted(p.name for p in (out / "cases").iterdir())


def _contents(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_facts_run_resume_and_interrupt(facts_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["trace", "--facts", str(facts_file), "--limit", "3", "--out", str(out), *ARGS]) == 0
    expected = sorted(f"knowledge_{i}{s}.npz" for i in (10, 11, 12) for s in ("", "_mlp", "_attn"))
    assert _cases(out) == expected
    assert "ATE" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hidden"]["n_facts"] == 3 and summary["hidden"]["n_correct"] == 2
    for name in ("aie_heatmap.png", "aie_heatmap.pdf", "aie_lines.png", "aie_lines.pdf", "run.json"):
        assert (out / name).is_file()
    with np.load(out / "cases" / "knowledge_11.npz") as d:
        assert not d["correct_prediction"]

    # a rerun computes nothing and leaves the files alone
    calls = []
    real = runner.calculate_hidden_flow
    monkeypatch.setattr(runner, "calculate_hidden_flow", lambda *a, **k: calls.append(1) or real(*a, **k))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cases").iterdir()}
    assert main(["trace", "--facts", str(facts_file), "--limit", "3", "--out", str(out), *ARGS]) == 0
    assert calls == [] and mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "cases").iterdir()}

    # interrupted after the first fact's three kinds, then resumed: the same results
    broken = tmp_path / "broken"

    def dies_after_first_fact(*a, **k):
        if len(calls) >= 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "calculate_hidden_flow", dies_after_first_fact)
    assert main(["trace", "--facts", str(facts_file), "--limit", "3", "--out", str(broken), *ARGS]) == 130
    assert _cases(broken) == ["knowledge_10.npz", "knowledge_10_attn.npz", "knowledge_10_mlp.npz"]
    monkeypatch.setattr(runner, "calculate_hidden_flow", real)
    assert main(["trace", "--facts", str(facts_file), "--limit", "3", "--out", str(broken), *ARGS]) == 0
    assert _cases(broken) == expected
    for name in expected:
        _same(_contents(out / "cases" / name), _contents(broken / "cases" / name))
    assert json.loads((broken / "summary.json").read_text()) == summary

    # resuming with other settings would mix incompatible results: refused
    assert main(["trace", "--facts", str(facts_file), "--limit", "3", "--out", str(out), "--noise", "s2",
                 *ARGS]) == 2
    assert "other settings" in capsys.readouterr().err


def test_single_fact(tmp_path, capsys):
    out = tmp_path / "one"
    prompt, subject = PROMPTS[1]
    assert main(["trace", "--prompt", prompt, "--subject", subject, "--kind", "mlp", "--window", "2",
                 "--noise", "u0.3", "--model", "tiny:llama", "--samples", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["trace_mlp.npz", "trace_mlp.pdf", "trace_mlp.png"]
    with np.load(out / "trace_mlp.npz") as d:
        assert str(d["kind"]) == "mlp" and int(d["window"]) == 2
    assert "strongest at" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--noise", "q7"], "unknown noise rule"),
    (["--subject", "Space Needle"], "does not occur"),
    (["--noise", "m"], "corpus"),
])
def test_single_fact_errors(tmp_path, capsys, extra, message):
    prompt, subject = PROMPTS[0]
    args = ["trace", "--prompt", prompt, "--subject", subject, "--kind", "hidden", "--out", str(tmp_path),
            "--model", "tiny:gpt2", "--samples", "2"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_unknown_tiny_family(tmp_path, capsys):
    assert main(["trace", "--prompt", "a b", "--subject", "a", "--model", "tiny:nope", "--out", str(tmp_path)]) == 2
    assert "unknown tiny model family" in capsys.readouterr().err


def test_demo_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny:gpt2", "--kind", "hidden", "--samples", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Clean run" in text and "σ" in text and "What this suggests" in text
    for name in ("eiffel_tower.npz", "eiffel_tower.png", "eiffel_tower.pdf", "summary.json"):
        assert (out / name).is_file()
