"""The evaluation loop on a tiny model with an injected rank-one editor: case files, resuming,
interruption, weight restoration and the summary."""
import json

import pytest
import torch

from rome_fast.eval import datasets as D
from rome_fast.eval import metrics as M
from rome_fast.eval import runner as R

from cf_cases import COMPACT_CASES
from interrupts import FailOnCall

COMPACT = COMPACT_CASES[:3]


@pytest.fixture(scope="module")
def mt():
    from rome_fast.models import ModelAndTokenizer
    from rome_fast.models.random_init import random_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards only lose to threading on a shared machine
    model, tok = random_model("llama", seed=2)
    yield ModelAndTokenizer(model=model, tokenizer=tok)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cf.json"
    path.write_text(json.dumps(COMPACT))
    return D.load_counterfact(path)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


class RankOneEditor:
    """Adds a fixed random rank-one delta to one MLP output weight; checks on every call that
    the model it is given is the original (so the previous case was restored)."""

    def __init__(self, mt, fail_on_call=None, restore=True):
        self.original = snapshot(mt.model)
        self.calls, self.fail_on_call, self.do_restore = 0, fail_on_call, restore
        w = mt.adapter.rewrite_weight(1)
        g = torch.Generator().manual_seed(0)
        self.delta = torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g))

    def __call__(self, mt, request):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during this edit
        assert {"prompt", "subject", "target_new"} <= set(request) and "{}" in request["prompt"]
        assert_same_weights(mt.model, self.original)
        w = mt.adapter.rewrite_weight(1)
        saved = w.detach().clone()
        with torch.no_grad():
            w += self.delta

        def restore():
            if self.do_restore:
                with torch.no_grad():
                    w.copy_(saved)
        return restore


def read_cases(out):
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("case_*.json"))}


def without_time(cases):
    return {k: {**v, "time": None} for k, v in cases.items()}


def test_run_resume_and_summary(mt, records, tmp_path):
    out = tmp_path / "run"
    original = snapshot(mt.model)
    editor = RankOneEditor(mt)
    summary = R.evaluate(mt, "counterfact", records, None, out, editor=editor, progress=False,
                         check_restore=True)
    assert editor.calls == 3
    assert_same_weights(mt.model, original)
    cases = read_cases(out)
    assert sorted(cases) == ["case_11.json", "case_12.json", "case_3.json"]
    c = cases["case_3.json"]
    assert set(c) == {"case_id", "requested_rewrite", "time", "post", "pre"}
    assert c["requested_rewrite"]["prompt"] == "The mother tongue of {} is"
    assert len(c["post"]["text"]) == 2 and c["post"]["text"][0].startswith("The mother tongue of")
    # pre = the unedited model's metrics; post differs because of the edit
    r0 = records[0]
    assert c["pre"]["rewrite_prompts_probs"] == [
        {"target_new": pytest.approx(a, rel=1e-5), "target_true": pytest.approx(b, rel=1e-5)}
        for a, b in [M.target_nll(mt.model, mt.tokenizer, [(r0.rewrite_prompt, "English"),
                                                           (r0.rewrite_prompt, "French")])]]
    assert c["post"]["rewrite_prompts_probs"] != c["pre"]["rewrite_prompts_probs"]

    # the summary agrees with a hand aggregation of the case files
    post = [M.counterfact_case_scores(x["post"]) for x in cases.values()]
    assert summary["n"] == 3 and summary["dataset"] == "counterfact"
    assert summary["post"]["ES"]["mean"] == pytest.approx(100 * sum(p["ES"] for p in post) / 3)
    assert summary["post"]["S"] == pytest.approx(M.harmonic_mean(
        [summary["post"][k]["mean"] for k in ("ES", "PS", "NS")]))
    assert "GE" in summary["pre"] and "compact" in summary["notes"]["GE"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "ES" in R.format_summary(summary)

    # a rerun skips every case and leaves the files as they were
    again = RankOneEditor(mt)
    R.evaluate(mt, "counterfact", records, None, out, editor=again, progress=False)
    assert again.calls == 0 and read_cases(out) == cases

    # an interrupted run, then a rerun, gives the same files as the uninterrupted one
    out2 = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", records, None, out2, editor=RankOneEditor(mt, fail_on_call=2),
                   progress=False)
    assert sorted(read_cases(out2)) == ["case_3.json"]
    assert not list(out2.glob(".tmp-*"))  # no half-written files left behind
    assert_same_weights(mt.model, original)
    R.evaluate(mt, "counterfact", records, None, out2, editor=RankOneEditor(mt), progress=False)
    assert without_time(read_cases(out2)) == without_time(cases)


def test_interrupt_during_metrics_restores(mt, records, tmp_path, monkeypatch):
    original = snapshot(mt.model)
    FailOnCall(monkeypatch, R, "case_metrics", at=1)  # the post-edit metrics of the first case
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", records, None, tmp_path, editor=RankOneEditor(mt),
                   skip_generation=True, progress=False)
    assert_same_weights(mt.model, original)
    assert not list(tmp_path.glob("case_*.json"))


def test_broken_restore_is_caught(mt, records, tmp_path):
    original = snapshot(mt.model)
    editor = RankOneEditor(mt, restore=False)
    with pytest.raises(RuntimeError, match="not restored|differ"):
        R.evaluate(mt, "counterfact", records, None, tmp_path, editor=editor, skip_generation=True,
                   progress=False, check_restore=True)
    mt.model.load_state_dict(original)


def test_zsre_run_and_mixing_guard(mt, tmp_path):
    raw = [{"subject": "Toyota", "src": "Where is Toyota headquartered?",
            "rephrase": "Toyota's headquarters are in which country?", "answers": ["Japan"],
            "alt": "Spain", "loc": "nq question: who founded apple", "loc_ans": "Steve Jobs"},
           {"subject": "Nile", "src": "Which country does the Nile flow through?",
            "rephrase": "The Nile flows through which country?", "answers": ["Egypt"],
            "alt": "Peru", "loc": "nq question: capital of italy", "loc_ans": "Rome"}]
    path = tmp_path / "z.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "z"
    s = R.evaluate(mt, "zsre", path, None, out, editor=RankOneEditor(mt), progress=False,
                   check_restore=True)
    assert s["dataset"] == "zsre" and s["n"] == 2
    assert set(s["post"]) == {"Efficacy", "Paraphrase", "Specificity"}
    case = json.loads((out / "case_1.json").read_text())
    assert case["requested_rewrite"]["target_new"] == {"str": "Egypt"}
    assert len(case["pre"]["neighborhood_prompts_correct"]) == len(M.target_ids(mt.tokenizer, "Rome"))
    with pytest.raises(ValueError, match="dataset"):  # a CounterFact run into a zsRE folder
        R.evaluate(mt, "counterfact", [], None, out, editor=RankOneEditor(mt), progress=False)


def test_cli_parses_eval():
    from rome_fast.cli import build_parser
    args = build_parser().parse_args(["eval", "--dataset", "zsre", "--limit", "5", "--out", "x",
                                      "--skip-generation", "--backend", "fast"])
    assert (args.dataset, args.limit, args.out, args.skip_generation, args.backend) == ("zsre", 5, "x", True, "fast")
    assert args.model == "smollm2-135m"
