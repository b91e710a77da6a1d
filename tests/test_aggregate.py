"""TraceResult files and the averaged causal effects (docs/tracing.md)."""
import json

import numpy as np
import pytest
import torch

from rome_fast.trace.aggregate import BUCKETS, aggregate_dir, aggregate_results, bucket_rows, case_path
from rome_fast.trace.api import calculate_hidden_flow
from rome_fast.trace.results import TraceResult

FACTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
         ("Miles Davis plays the", "Miles Davis"),
         ("The official language of Brazil is", "Brazil"),
         ("Danielle Darrieux was a French actress", "Danielle Darrieux")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_results(tiny_models):
    mt = tiny_models["gpt2"]
    out = [TraceResult.from_dict(calculate_hidden_flow(mt, p, s, samples=2, noise=0.5)) for p, s in FACTS]
    out.append(TraceResult.from_dict(calculate_hidden_flow(mt, FACTS[0][0], FACTS[0][1], samples=2, noise=0.5,
                                                           expect="not the answer")))
    return out


def test_save_load_round_trip(tiny_results, tmp_path):
    r = tiny_results[0]
    path = r.save(tmp_path / "cases" / "knowledge_0.npz")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    with np.load(path, allow_pickle=False) as data:  # plain arrays, as the reference writes
        assert set(data.files) == {"scores", "low_score", "high_score", "input_ids", "input_tokens",
                                   "subject_range", "answer", "window", "correct_prediction", "kind"}
        assert data["high_score"].dtype == np.float32 and str(data["kind"]) == ""
    back = TraceResult.load(path)
    torch.testing.assert_close(back.scores, r.scores)
    torch.testing.assert_close(back.input_ids, r.input_ids)
    assert back.low_score == r.low_score and back.high_score == pytest.approx(r.high_score, rel=1e-7)
    assert back.input_tokens == r.input_tokens and back.subject_range == r.subject_range
    assert back.answer == r.answer and back.window == r.window and back.kind == r.kind
    assert back.correct_prediction is True
    wrong = TraceResult.load(tiny_results[-1].save(tmp_path / "w.npz"))
    assert wrong.correct_prediction is False and wrong.scores is None
    # overwriting is atomic too, and the dict view keeps the reference's keys
    r.save(path)
    assert set(TraceResult.load(path).to_dict()) >= {"scores", "low_score", "high_score", "answer"}


def test_bucket_rows():
    s = np.arange(9 * 2, dtype=float).reshape(9, 2)
    b = bucket_rows(s, (1, 5))  # subject 1-4: middle 2, 3; next 5; further 6, 7; last 8
    assert [len(x) for x in b] == [1, 2, 1, 1, 2, 1]
    np.testing.assert_array_equal(b[0][0], s[1])
    np.testing.assert_array_equal(np.stack(b[1]), s[2:4])
    np.testing.assert_array_equal(b[2][0], s[4])
    np.testing.assert_array_equal(b[3][0], s[5])
    np.testing.assert_array_equal(np.stack(b[4]), s[6:8])
    np.testing.assert_array_equal(b[5][0], s[8])
    one = bucket_rows(s, (0, 1))  # one-token subject: first and last subject token are the same row
    np.testing.assert_array_equal(one[0][0], one[2][0])
    assert len(one[1]) == 0


def test_aggregate_equals_hand_computation(tiny_results):
    agg = aggregate_results(tiny_results, "hidden")
    correct = [r for r in tiny_results if r.correct_prediction]
    assert agg.n_facts == 5 and agg.n_correct == 4
    low = np.mean([r.low_score for r in correct])
    high = np.mean([r.high_score for r in correct])
    assert agg.ate == pytest.approx(high - low)
    # last subject token and "further tokens", written out
    last_subj = np.stack([r.scores[r.subject_range[1] - 1].double().numpy() for r in correct])
    np.testing.assert_allclose(agg.aie[2], last_subj.mean(0) - low)
    further = [r.scores[t].double().numpy() for r in correct
               for t in range(r.subject_range[1] + 1, len(r.scores) - 1)]
    np.testing.assert_allclose(agg.mean[4], np.mean(further, axis=0))
    np.testing.assert_allclose(agg.ci95[4], 1.96 * np.std(further, axis=0) / np.sqrt(len(further)))
    assert agg.count[4] == len(further) and agg.count[5] == 4
    value, layer = agg.best(5)
    last_tok = np.stack([r.scores[-1].double().numpy() for r in correct]).mean(0) - low
    assert layer == int(np.argmax(last_tok)) and value == pytest.approx(last_tok.max())
    assert agg.best_fixed == pytest.approx(np.mean([float(r.scores.max()) for r in correct]))


def test_aggregate_dir_writes_summary_and_figures(tiny_results, tmp_path):
    for i, r in enumerate(tiny_results):
        r.save(case_path(tmp_path / "cases", i, "hidden"))
    summary = aggregate_dir(tmp_path, kinds=("hidden", "mlp"))
    assert list(summary) == ["hidden"]  # no mlp results
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["hidden"]["ate"] == pytest.approx(aggregate_results(tiny_results).ate)
    assert set(on_disk["hidden"]["buckets"]) == set(BUCKETS)
    for name in ("aie_heatmap", "aie_lines"):
        for ext in (".png", ".pdf"):
            assert (tmp_path / (name + ext)).stat().st_size > 1000
    only_two = aggregate_dir(tmp_path, kinds=("hidden",), ids=[0, 1], figures=False)
    assert only_two["hidden"]["n_facts"] == 2


def test_aggregate_needs_a_correct_fact(tiny_results):
    with pytest.raises(ValueError, match="no correctly predicted"):
        aggregate_results([tiny_results[-1]])
