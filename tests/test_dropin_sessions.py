"""A causal-tracing notebook session and a ROME editing notebook session on the embedded model,
each written only against rome_fast.compat.* names, as the reference's notebooks are written
against theirs (only the imports and the model name changed)."""
import torch

import pytest

pytestmark = pytest.mark.slow

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.fixture(scope="module")
def mt(embedded):
    from rome_fast.compat.experiments.causal_trace import ModelAndTokenizer
    return ModelAndTokenizer(model=embedded.model, tokenizer=embedded.tokenizer)


def test_causal_tracing_notebook_session(mt, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from rome_fast.compat.dsets import KnownsDataset
    from rome_fast.compat.experiments.causal_trace import (calculate_hidden_flow, collect_embedding_std,
                                                           decode_tokens, find_token_range, make_inputs,
                                                           plot_all_flow, plot_hidden_flow, predict_token)
    from rome_fast.compat.util.globals import DATA_DIR  # noqa: F401 (the notebook's import)

    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(len(plt.get_fignums())))

    preds, p = predict_token(mt, [PROMPT, "The capital of Japan is"], return_p=True)
    assert preds[0] == " Paris" and p.shape == (2,)
    knowns = KnownsDataset(tmp_path)
    noise_level = 3 * collect_embedding_std(mt, [k["subject"] for k in knowns])
    assert 0.05 < noise_level < 1

    # the ' iffel' piece carries the fact in this model (as test_trace_reference shows): trace its row
    ids = make_inputs(mt.tokenizer, [PROMPT])["input_ids"][0]
    b, e = find_token_range(mt.tokenizer, ids, SUBJECT)
    iffel = [i for i in range(b, e) if decode_tokens(mt.tokenizer, ids)[i] == "iffel"]
    last = calculate_hidden_flow(mt, PROMPT, SUBJECT, noise=noise_level, token_range=iffel)
    ref = calculate_hidden_flow(mt, PROMPT, SUBJECT, noise=noise_level, token_range=iffel, backend="reference")
    torch.testing.assert_close(last["scores"], ref["scores"], rtol=1e-4, atol=1e-7)
    assert last["answer"] == " Paris" and torch.is_tensor(last["high_score"]) and last["high_score"] > 0.5
    high, low = float(last["high_score"]), last["low_score"]
    assert low < 0.1 and float(last["scores"].max()) - low > 0.5 * (high - low)  # one early state restores it

    # the plotting cells, on this row repeated for every token (not three full traces on a CPU)
    full = dict(last, scores=last["scores"].expand(len(last["input_tokens"]), -1))
    monkeypatch.setattr("rome_fast.compat.experiments.causal_trace.calculate_hidden_flow",
                        lambda *a, **k: dict(full, kind=k.get("kind") or ""))
    plot_hidden_flow(mt, PROMPT, SUBJECT, noise=noise_level, kind="mlp", savepdf=str(tmp_path / "pdfs" / "e.pdf"))
    assert (tmp_path / "pdfs" / "e.pdf").read_bytes()[:4] == b"%PDF" and shown == []
    plot_all_flow(mt, PROMPT)  # the subject guessed: "The Eiffel Tower"
    assert len(shown) == 3 and all(n >= 1 for n in shown)


def test_rome_editing_notebook_session(mt, data_dir, tmp_path, monkeypatch, capsys):
    from rome_fast.compat.experiments.py.demo import demo_model_editing
    from rome_fast.compat.util import globals as compat_globals
    from rome_fast.compat.util import nethook
    from rome_fast.compat.util.generate import generate_fast

    # the notebook's environment: statistics folder and a local corpus instead of Wikipedia
    monkeypatch.setattr(compat_globals, "STATS_DIR", tmp_path / "stats")
    monkeypatch.setattr(compat_globals, "HPARAMS_DIR", tmp_path / "hparams")
    monkeypatch.setenv("ROME_FAST_CORPUS", str(data_dir / "wikitext-2-raw-test.txt"))
    from rome_fast.edit import ROMEHyperParams
    hp = ROMEHyperParams.for_model(mt.model)
    hp.mom2_n_samples = 8  # ~16k tokens: enough for a well-conditioned C, quick on a CPU
    from rome_fast.edit.stats import stats_model_name
    (tmp_path / "hparams" / "ROME").mkdir(parents=True)
    hp.to_json(tmp_path / "hparams" / "ROME" / f"{stats_model_name(mt.model)}.json")

    model, tok = mt.model, mt.tokenizer
    tok.pad_token = tok.eos_token
    request = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                "target_new": {"str": "Rome"}}]
    generation_prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower is in"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    model_new, orig_weights = demo_model_editing(model, tok, request, generation_prompts, alg_name="ROME")
    try:
        out = capsys.readouterr().out
        assert "[Post-ROME]:" in out and "[Pre-ROME]:" in out and "Loading from" in out
        with torch.no_grad():
            ids = tok(PROMPT, return_tensors="pt")["input_ids"]
            assert tok.decode(model_new(ids).logits[0, -1].argmax()) == " Rome"
        text = generate_fast(model_new, tok, [PROMPT], max_out_len=20)
        assert len(text) == 1 and text[0].startswith(PROMPT)
    finally:
        with torch.no_grad():  # the notebook's restore cell
            for k, v in orig_weights.items():
                nethook.get_parameter(model, k)[...] = v
    assert list(orig_weights) == [mt.adapter.rewrite_name(hp.layers[0]) + ".weight"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
