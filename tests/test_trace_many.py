"""Fact sets on the fast engine: the same files as the reference runner, resumable, batched."""
import json

import numpy as np
import pytest

from rome_fast.cli import main
from rome_fast.trace import many
from rome_fast.trace.engine import TraceEngine

PROMPTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
           ("Miles Davis plays the", "Miles Davis"),
           ("The Louvre is a museum in", "The Louvre"),
           ("Toyota is headquartered in", "Toyota"),
           ("Berlin is the capital of", "Berlin")]
ARGS = ["--model", "tiny:llama", "--samples", "3", "--noise", "0.5", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def facts_file(make_facts_file):
    return make_facts_file("tiny:llama", PROMPTS, wrong={2})


def _load(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _files(out):
    return sorted(p.name for p in (out / "cases").iterdir())


def test_fast_run_equals_reference_run(facts_file, tmp_path):
    ref, fast = tmp_path / "ref", tmp_path / "fast"
    assert main(["trace", "--facts", str(facts_file), "--out", str(ref), "--backend", "reference", *ARGS]) == 0
    assert main(["trace", "--facts", str(facts_file), "--out", str(fast), "--backend", "fast", *ARGS]) == 0
    assert _files(ref) == _files(fast) and len(_files(ref)) == 15
    for name in _files(ref):
        a, b = _load(ref / "cases" / name), _load(fast / "cases" / name)
        assert a.keys() == b.keys(), name
        for key in a:
            if a[key].dtype.kind == "f":
                # as test_trace_engine: scores within a relative 1e-5 (measured: 2.5e-6)
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-9, err_msg=f"{name}:{key}")
            else:
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"{name}:{key}")
    with np.load(fast / "cases" / "knowledge_2.npz") as d:
        assert not d["correct_prediction"]
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((fast / "summary.json").read_text())
    assert sa["hidden"]["n_correct"] == sb["hidden"]["n_correct"] == 4


def test_interrupted_fast_run_resumes_without_recomputing(facts_file, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    monkeypatch.setattr(many, "default_facts_per_batch", lambda engine: 2)
    assert main(["trace", "--facts", str(facts_file), "--out", str(whole), "--backend", "fast", *ARGS]) == 0

    traced = []
    real = TraceEngine.trace

    def dies_in_second_batch(self, facts, kinds=("hidden", "mlp", "attn"), **kw):
        if kinds:
            if traced:
                raise KeyboardInterrupt
            traced.extend(f.input_ids for f in facts)
        return real(self, facts, kinds=kinds, **kw)

    monkeypatch.setattr(TraceEngine, "trace", dies_in_second_batch)
    assert main(["trace", "--facts", str(facts_file), "--out", str(broken), "--backend", "fast", *ARGS]) == 130
    first = _files(broken)
    assert 0 < len(first) < 15  # the first batch is on disk, nothing half-written
    assert not any(p.name.startswith(".") for p in (broken / "cases").iterdir())

    recomputed = []

    def counting(self, facts, kinds=("hidden", "mlp", "attn"), **kw):
        if kinds:
            recomputed.extend(f.input_ids for f in facts)
        return real(self, facts, kinds=kinds, **kw)

    monkeypatch.setattr(TraceEngine, "trace", counting)
    assert main(["trace", "--facts", str(facts_file), "--out", str(broken), "--backend", "fast", *ARGS]) == 0
    assert not set(map(tuple, recomputed)) & set(map(tuple, traced))  # finished facts not redone
    assert _files(broken) == _files(whole)
    for name in _files(whole):
        a, b = _load(whole / "cases" / name), _load(broken / "cases" / name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    recomputed.clear()
    assert main(["trace", "--facts", str(facts_file), "--out", str(broken), "--backend", "fast", *ARGS]) == 0
    assert recomputed == []
