"""The kinds registry: the reference's spellings at the edge, one spelling inside, and a new kind
that is nothing but one `register_kind` call (engine, api, files, aggregate, figures, CLI)."""
import json

import pytest
import torch

from rome_fast.cli import build_parser
from rome_fast.trace import kinds as K
from rome_fast.trace.aggregate import aggregate_dir, case_path
from rome_fast.trace.api import calculate_hidden_flow
from rome_fast.trace.reference import window_layers
from rome_fast.trace.results import TraceResult
from rome_fast.trace.runner import trace_facts

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


def test_spellings():
    for spelling in (None, "", "None", "hidden", K.KINDS["hidden"]):
        assert K.get_kind(spelling).name == "hidden"
    assert [K.get_kind(k).stored for k in ("hidden", "mlp", "attn")] == ["", "mlp", "attn"]
    assert [K.get_kind(k).argument for k in ("hidden", "mlp", "attn")] == [None, "mlp", "attn"]
    assert [K.get_kind(k).suffix for k in ("hidden", "mlp", "attn")] == ["", "_mlp", "_attn"]
    assert K.kind_names("all") == ["hidden", "mlp", "attn"] and K.kind_names(None) == ["hidden"]
    assert K.kind_names(["attn", ""]) == ["attn", "hidden"]
    assert K.stored_kind("hidden") == "" and K.stored_kind(None) == "" and K.stored_kind("x") == "x"
    with pytest.raises(ValueError, match="unknown kind 'foo'"):
        K.get_kind("foo")
    with pytest.raises(ValueError, match="exists"):
        K.register_kind(K.KINDS["mlp"])


def test_restore_rules_match_the_reference_window():
    for n, w in ((30, 10), (4, 3), (4, 10), (5, 1), (6, 4)):
        for layer in range(n):
            assert range(*K.window_bounds(layer, w, n)) == window_layers(layer, w, n)
            span = K.KINDS["mlp"].plan(layer, w, n)
            assert (span.start, span.lo) == (min(window_layers(layer, w, n)),) * 2
            assert K.KINDS["hidden"].plan(layer, w, n) == (layer + 1, layer, layer + 1)


@pytest.fixture
def new_kind():
    """An MLP output restored at one layer whatever the window: the engine must give exactly the
    reference's mlp scores of window 1."""
    kind = K.register_kind(K.TraceKind(
        "mlp1", "mlp1", "_mlp1", "mlp_name", lambda layer, window, n: K.Span(layer, layer, layer + 1),
        "Blues", "MLP (one layer)", "Impact of restoring one MLP", "restored MLP layer within {model}",
        "restored MLP layer", "MLP outputs (one layer)"))
    yield kind
    del K.KINDS[kind.name]


def test_a_new_kind_is_one_registry_entry(new_kind, tiny_models, tmp_path, make_facts_file):
    mt = tiny_models["llama"]
    ref = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=0.5, window=1, kind="mlp",
                                backend="reference")
    fast = calculate_hidden_flow(mt, PROMPT, SUBJECT, samples=3, noise=0.5, window=5, kind="mlp1")
    assert fast["kind"] == "mlp1"
    torch.testing.assert_close(fast["scores"], ref["scores"].float(), rtol=1e-5, atol=1e-9)
    assert float(ref["scores"].max() - ref["scores"].min()) > 1e-3  # restoring changes something

    # a facts run writes its files, averages it and draws it; the command line offers it
    facts = json.loads(make_facts_file("tiny:llama", [(PROMPT, SUBJECT)]).read_text())
    summary = trace_facts(mt, facts, tmp_path, kinds=["mlp1"], noise=0.5, samples=3, progress=False)
    r = TraceResult.load(case_path(tmp_path / "cases", 0, "mlp1"))
    assert case_path(tmp_path / "cases", 0, "mlp1").name == "knowledge_0_mlp1.npz" and r.kind == "mlp1"
    assert list(summary) == ["mlp1"] and (tmp_path / "aie_heatmap.png").is_file()
    assert list(aggregate_dir(tmp_path, "all", figures=False)) == ["mlp1"]
    args = build_parser().parse_args(["trace", "--kind", "mlp1", "--prompt", "x", "--out", "o"])
    assert args.kind == "mlp1"
