"""Statistics at scale on a tiny model: a run interrupted (in process, by SIGKILL, or by a dead
torchrun rank) and rerun ends with the same file as an uninterrupted one; checkpoints of other
settings are refused; NaN keys name their text; --until-converged stops and names the file by
the texts used; a 2-rank gloo run equals one process; one statistics name per model."""
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rome_fast.edit.fast_stats import layer_stats_fast
from rome_fast.edit.stats import layer_stats, sample_order, stats_model_name
from rome_fast.edit.stats_checkpoint import SUFFIX
from rome_fast.models.random_init import random_texts, tiny_tokenizer

from test_distributed import run_cli
from test_stats_stream import Stop as Interrupt, stop_after as interrupt_after

pytestmark = pytest.mark.usefixtures("one_thread")
L1, L2 = "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def corpus():
    return list(random_texts(1600, 3, words=(3, 20)))


def files(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_interrupted_run_resumes_to_the_same_bits(llama, corpus, tmp_path):
    m, tok = llama.model, llama.tokenizer
    kw = dict(sample_size=600, corpus=corpus, progress=False, checkpoint_texts=100)
    whole = layer_stats_fast(m, tok, [L1, L2], tmp_path / "whole", "c", **kw)
    with pytest.raises(Interrupt):
        layer_stats_fast(m, tok, [L1, L2], tmp_path / "cut", "c", after_round=interrupt_after(4), **kw)
    # no statistics file yet, only the checkpoint of the pass (named after its last layer)
    assert files(tmp_path / "cut") == [f"LlamaForCausalLM/c_stats/.checkpoints/{L2}_float32_mom2_600"
                                       f"+1-more-layers.rank0{SUFFIX}"]
    again = layer_stats_fast(m, tok, [L1, L2], tmp_path / "cut", "c", **kw)
    for n in (L1, L2):
        assert again[n].mom2.mom2.dtype == torch.float32 and again[n].mom2.count == whole[n].mom2.count
        assert torch.equal(again[n].mom2.mom2, whole[n].mom2.mom2)
        with np.load(again[n].path) as a, np.load(whole[n].path) as b:
            assert a["mom2.mom2"].tobytes() == b["mom2.mom2"].tobytes()
    assert not (tmp_path / "cut" / "LlamaForCausalLM" / "c_stats" / ".checkpoints").exists()  # cleaned up
    rec = json.loads(again[L1].path.with_name(again[L1].path.stem + ".convergence.json").read_text())
    assert [p["texts"] for p in rec["curve"]] == [100, 200, 400, 600] and rec["keys"] == whole[L1].mom2.count
    # the same sums as the plain (reference) collector
    ref = layer_stats(m, tok, L2, None, "c", sample_size=600, corpus=corpus, progress=False)
    # (relative to the whole matrix: fp32 sums in another order differ most where entries cancel)
    diff = float((again[L2].mom2.mom2.double() - ref.mom2.mom2.double()).norm() / ref.mom2.mom2.double().norm())
    assert diff < 1e-6


def test_checkpoint_of_another_model_or_corpus_is_refused(llama, corpus, tmp_path):
    m, tok = llama.model, llama.tokenizer
    kw = dict(sample_size=300, progress=False, checkpoint_texts=100)
    with pytest.raises(Interrupt):
        layer_stats_fast(m, tok, L1, tmp_path, "c", corpus=corpus, after_round=interrupt_after(2), **kw)
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="other settings \\(model_fingerprint: .*--restart"):
        layer_stats_fast(other, tok, L1, tmp_path, "c", corpus=corpus, **kw)
    with pytest.raises(ValueError, match="other settings \\(corpus_fingerprint: "):
        layer_stats_fast(m, tok, L1, tmp_path, "c", corpus=corpus[::-1], **kw)
    fresh = layer_stats_fast(other, tok, L1, tmp_path, "c", corpus=corpus, restart=True, **kw)
    assert fresh.mom2.count > 0 and fresh.path.is_file()
    # a pass over other layers that ends at the same layer finds the checkpoint, and refuses it
    L0 = "model.layers.0.mlp.down_proj"
    with pytest.raises(Interrupt):
        layer_stats_fast(m, tok, [L0, L2], tmp_path / "layers", "c", corpus=corpus, after_round=interrupt_after(1),
                         **kw)
    names = f"names: \\['{L0}', '{L2}'\\] there, \\['{L1}', '{L2}'\\] now"
    with pytest.raises(ValueError, match=f"other settings \\({names}"):
        layer_stats_fast(m, tok, [L1, L2], tmp_path / "layers", "c", corpus=corpus, **kw)


def test_non_finite_keys_stop_with_the_text_index(llama):
    tok = llama.tokenizer
    bad_id = tok(" Darrieux")["input_ids"]
    assert len(bad_id) == 1
    texts = [t for t in random_texts(400, 2, words=(3, 15)) if bad_id[0] not in tok(t)["input_ids"]][:300]
    order = sample_order(len(texts))
    pos = 123
    texts[order[pos]] += " Darrieux plays"
    model = copy.deepcopy(llama.model)
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_id[0]] = float("nan")
    with pytest.raises(FloatingPointError, match=f"text {pos} of the sample \\(text {order[pos]} of the corpus\\)"):
        layer_stats_fast(model, tok, L1, None, "c", corpus=texts, progress=False)


def test_until_converged_stops_and_names_the_file_by_the_texts_used(llama, corpus, tmp_path):
    m, tok = llama.model, llama.tokenizer
    out = {}
    st = layer_stats_fast(m, tok, L1, tmp_path, "c", sample_size=None, corpus=corpus, progress=False,
                          until_converged=0.3, stats_out=out)
    assert out["converged"] and st.sample_size == out["texts"] < len(corpus)
    assert st.path.name == f"{L1}_float32_mom2_{out['texts']}.npz"
    rec = json.loads(st.path.with_name(st.path.stem + ".convergence.json").read_text())
    assert rec["converged"] and rec["texts"] == out["texts"] and rec["curve"][-1]["max_change"] < 0.3
    assert all(p["max_change"] is None or p["max_change"] >= 0.3 for p in rec["curve"][:-1])
    # exactly the file a fixed-size run of that many texts writes (the same prefix of the order)
    fixed = layer_stats_fast(m, tok, L1, tmp_path / "fixed", "c", sample_size=out["texts"], corpus=corpus,
                             progress=False)
    assert torch.equal(fixed.mom2.mom2, st.mom2.mom2)
    # the same command again finds it without reading the corpus
    again = layer_stats_fast(m, tok, L1, tmp_path, "c", sample_size=None, corpus=["unused"], progress=False,
                             until_converged=0.3)
    assert again.path == st.path and torch.equal(again.mom2.mom2, st.mom2.mom2)


def test_probe_keys_of_requests_drive_the_curve(llama, corpus):
    m, tok = llama.model, llama.tokenizer
    requests = [{"prompt": "{} is located in", "subject": "The Louvre"},
                {"prompt": "{} plays the", "subject": "Miles Davis"}]
    a, b = {}, {}
    layer_stats_fast(m, tok, L1, None, "c", sample_size=400, corpus=corpus, progress=False, stats_out=a)
    layer_stats_fast(m, tok, L1, None, "c", sample_size=400, corpus=corpus, progress=False, stats_out=b,
                     probe_requests=requests)
    assert [p["keys"] for p in a["curve"]] == [p["keys"] for p in b["curve"]]
    assert a["curve"][-1]["max_change"] != b["curve"][-1]["max_change"]
    with pytest.raises(ValueError, match="has no '\\{\\}'"):
        layer_stats_fast(m, tok, L1, None, "c", corpus=corpus, progress=False,
                         probe_requests=[{"prompt": "no slot", "subject": "x"}])


# ---------------------------------------------------------------------------------------------
# The command, killed with SIGKILL and under torchrun

@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("corpus") / "short.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:500]))
    return path


def stats_args(corpus_file, stats_dir, *extra):
    return ["stats", "--model", "tiny:llama", "--layer", "1", "--corpus", str(corpus_file), "--stats-dir",
            str(stats_dir), "--samples", "all", "--checkpoint-texts", "100", "--no-progress", *extra]


def stats_file(stats_dir, precision="float32"):
    return Path(stats_dir) / "LlamaForCausalLM" / "short_stats" / f"{L1}_{precision}_mom2.npz"


def read_sums(path):
    with np.load(path, allow_pickle=False) as f:
        return f["mom2.mom2"], int(f["mom2.count"])


@pytest.mark.slow
def test_sigkill_then_rerun_resumes(corpus_file, tmp_path):
    run_cli(stats_args(corpus_file, tmp_path / "whole"))
    # checkpoints at rounds 1, 2 (doublings) and every 300 texts: killed after round 3, the run
    # has a checkpoint of round 2 and redoes round 3
    p = run_cli(stats_args(corpus_file, tmp_path / "cut", "--checkpoint-texts", "300"), check=False,
                ROME_FAST_FAIL_RANK="0", ROME_FAST_FAIL_AFTER="3", ROME_FAST_FAIL_KILL="1")
    assert p.returncode == -signal.SIGKILL
    assert not stats_file(tmp_path / "cut").exists()
    assert [Path(f).name for f in files(tmp_path / "cut")] == [f"{L1}_float32_mom2.rank0{SUFFIX}"]
    p = run_cli(stats_args(corpus_file, tmp_path / "cut"))
    assert "500 texts" in p.stdout and "this run summed" in p.stdout
    a, b = read_sums(stats_file(tmp_path / "cut")), read_sums(stats_file(tmp_path / "whole"))
    assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes()  # the same bits


@pytest.mark.slow
def test_two_ranks_equal_one_and_a_dead_rank_resumes(corpus_file, tmp_path):
    args = lambda d, *x: stats_args(corpus_file, tmp_path / d, "--precision", "float64", *x)  # noqa: E731
    run_cli(args("one"))
    p = run_cli(args("two", "--until-converged", "1e-9"), nproc=2)
    assert p.stdout.count("keys of width") == 1  # rank 0 reports
    one, two = read_sums(stats_file(tmp_path / "one", "float64")), read_sums(stats_file(tmp_path / "two", "float64"))
    assert one[1] == two[1]
    np.testing.assert_allclose(two[0], one[0], rtol=1e-12, atol=1e-9)  # fp64 rounding only
    curve = json.loads(stats_file(tmp_path / "two", "float64").with_suffix(".convergence.json").read_text())["curve"]
    assert [c["texts"] for c in curve] == [200, 400, 500]  # rounds of 2 chunks: doublings, then the end

    # rank 1 dies after its second round: the run fails (no hang), no statistics file, the
    # checkpoints of both ranks remain; the rerun resumes and ends with the bits of an unbroken run
    p = run_cli(args("broken", "--until-converged", "1e-9"), nproc=2, check=False, ROME_FAST_FAIL_RANK="1",
                ROME_FAST_FAIL_AFTER="2")
    assert p.returncode != 0 and "failing on purpose after 2 round" in p.stdout + p.stderr
    assert not stats_file(tmp_path / "broken", "float64").exists()
    assert {Path(f).name for f in files(tmp_path / "broken")} >= {f"{L1}_float64_mom2.rank1{SUFFIX}"}
    run_cli(args("broken", "--until-converged", "1e-9"), nproc=2)
    again = read_sums(stats_file(tmp_path / "broken", "float64"))
    assert again[1] == two[1] and again[0].tobytes() == two[0].tobytes()


def test_one_statistics_name_for_the_embedded_model(embedded):
    """However the embedded model is reached (its alias, the cached conversion, its GGUF file),
    its statistics folder is `smollm2-135m`; another GGUF is named by its file, not its folder."""
    from rome_fast.models import loading
    gguf = loading.embedded_model_path()
    assert loading._embedded_or(gguf, gguf.stem) == loading.EMBEDDED_NAME
    assert loading._embedded_or(Path("/models/other.Q8_0.gguf"), "other.Q8_0") == "other.Q8_0"
    assert stats_model_name(embedded.model) == "smollm2-135m"  # loaded from the cached conversion

    class Cfg:
        _name_or_path = "/home/u/.cache/huggingface/hub/models--openai-community--gpt2-xl/snapshots/abc123"
    assert stats_model_name(type("M", (), {"config": Cfg})()) == "openai-community_gpt2-xl"
