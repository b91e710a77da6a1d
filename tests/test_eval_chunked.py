"""The mass-editing evaluation (--num-edits) on a tiny model: chunk folders written atomically,
resuming, conflicts dropped, sequential runs that save and reload their edit state, the
teacher-forced accuracies, and one real MEMIT run."""
import dataclasses
import json

import pytest
import torch

from rome_fast.eval import datasets as D
from rome_fast.eval import metrics as M
from rome_fast.eval import runner as R
from rome_fast.eval.chunked import ChunkEditor, chunk_dir, drop_conflicts

from cf_cases import COMPACT_CASES
from interrupts import FailOnCall

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(tmp_path, extra=()):
    cases = list(COMPACT_CASES) + [dict(c, case_id=100 + i, target_new=c["target_new"] + "s")
                                   for i, c in enumerate(COMPACT_CASES[:1])] + list(extra)
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(cases))
    return D.load_counterfact(path)


@pytest.fixture(scope="module")
def mt(tiny_models):
    return tiny_models["llama"]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _same_metrics(batched: dict, alone: dict) -> bool:
    """A record measured in a group of records equals it measured alone: the same keys and
    flags, NLLs within rounding (its sequences were padded with other records')."""
    assert batched.keys() == alone.keys()
    for k, v in alone.items():
        if k.endswith("_probs"):
            assert [sorted(r) for r in batched[k]] == [sorted(r) for r in v]
            assert [r[t] for r in batched[k] for t in sorted(r)] == pytest.approx([r[t] for r in v for t in sorted(r)],
                                                                                  rel=1e-5)
        else:
            assert batched[k] == v, k
    return True


class HashEditor:
    """Adds to one MLP weight a rank-one delta that depends on each request (so the order of
    sequential edits matters); can fail on a given call, like Ctrl-C."""

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, mt, requests):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        w = mt.adapter.rewrite_weight(1)
        orig = {"model.layers.1.mlp.down_proj.weight": w.detach().clone()}
        with torch.no_grad():
            for r in requests:
                g = torch.Generator().manual_seed(sum(map(ord, r["subject"] + r["target_new"]["str"])))
                w.mul_(0.9).add_(torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)))
        return orig

    def state_tensors(self):
        return {}

    def load_state_tensors(self, t):
        assert not t


def _cases(out):
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in sorted(out.glob("chunk_*/case_*.json"))}


def _no_time(cases):
    return {k: {**v, "time": None} for k, v in cases.items()}


def test_drop_conflicts(tmp_path):
    recs = _records(tmp_path)
    kept, dropped = drop_conflicts(recs)
    assert [r.case_id for r in kept] == [3, 11, 12, 20]
    assert dropped == [{"case_id": 100, "conflicts_with": 3, "subject": "Danielle Darrieux",
                        "prompt": "The mother tongue of {} is", "target_new": "Englishs", "kept_target": "English"}]
    same = [recs[0], dataclasses.replace(recs[0], case_id=7)]  # the same target twice is no conflict
    assert len(drop_conflicts(same)[0]) == 2


def test_chunks_resume_and_conflicts(mt, tmp_path):
    recs = _records(tmp_path)
    original = _snapshot(mt.model)
    kw = dict(method="memit", num_edits=2, skip_generation=True, progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, None, out, editor=HashEditor(fail_on_call=2), **kw)
    assert _same(mt.model, original)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("chunk")) == ["chunk_00000"]
    assert not list(out.glob(".chunk_*"))            # no partial chunk left behind
    ed = HashEditor()
    s = R.evaluate(mt, "counterfact", recs, None, out, editor=ed, **kw)
    assert ed.calls == 2 and _same(mt.model, original)   # chunks 1 and 2 only
    cases = _cases(out)
    assert sorted(cases) == ["chunk_00000/case_11.json", "chunk_00000/case_3.json", "chunk_00001/case_12.json",
                             "chunk_00001/case_20.json", "chunk_00002/case_100.json"]
    # chunk 2 is case 100 alone: it conflicts with case 3 only across chunks, so it is kept
    assert json.loads((chunk_dir(out, 2) / "chunk.json").read_text())["case_ids"] == [100]
    c = cases["chunk_00001/case_12.json"]
    assert c["num_edits"] == 2 and c["chunk"] == 1 and c["post"] != c["pre"]
    assert set(c["post"]) >= {"rewrite_prompts_correct", "paraphrase_prompts_correct", "neighborhood_prompts_correct"}
    assert s["n"] == 5 and s["chunks"]["edits"] == 5 and s["chunks"]["dropped_conflicts"] == 0
    assert "rewrite_acc" in s["post"]
    # pre is the unedited model's
    r0 = recs[0]
    nll, ok = M.target_nll(mt.model, mt.tokenizer, [(r0.rewrite_prompt, "English")], return_correct=True)
    assert cases["chunk_00000/case_3.json"]["pre"]["rewrite_prompts_probs"][0]["target_new"] == pytest.approx(nll[0])
    assert cases["chunk_00000/case_3.json"]["pre"]["rewrite_prompts_correct"] == ok
    # a rerun skips every chunk; a whole-run chunk of 5 drops the conflicting record
    again = HashEditor()
    R.evaluate(mt, "counterfact", recs, None, out, editor=again, **kw)
    assert again.calls == 0
    s5 = R.evaluate(mt, "counterfact", recs, None, tmp_path / "five", editor=HashEditor(), **{**kw, "num_edits": 5})
    assert s5["n"] == 4 and s5["chunks"]["dropped_conflicts"] == 1
    with pytest.raises(ValueError, match="num_edits"):  # another chunk size into the same folder
        R.evaluate(mt, "counterfact", recs, None, out, editor=HashEditor(), **{**kw, "num_edits": 3})


def _final(out):
    return {p.name: {**json.loads(p.read_text()), "time": None} for p in sorted(out.glob("case_*.json"))}


def test_sequential_resumes_to_the_same_state(mt, tmp_path):
    recs = _records(tmp_path)[:4]
    original = _snapshot(mt.model)
    kw = dict(method="memit", num_edits=1, sequential=True, skip_generation=True, progress=False)
    full = tmp_path / "full"
    R.evaluate(mt, "counterfact", recs, None, full, editor=HashEditor(), **kw)
    assert _same(mt.model, original)
    # the last chunk holds the state: the weights after every edit
    from safetensors.torch import load_file
    assert [p.parent.name for p in full.glob("chunk_*/state.safetensors")] == ["chunk_00003"]
    final = load_file(str(chunk_dir(full, 3) / "state.safetensors"))["weights.model.layers.1.mlp.down_proj.weight"]
    by_hand = HashEditor()
    orig = by_hand(mt, [r.request() for r in recs])
    assert torch.equal(mt.adapter.rewrite_weight(1), final)
    # every record measured once after the last batch ("post"), "pre" on the unedited model
    cases = _final(full)
    assert sorted(cases) == ["case_11.json", "case_12.json", "case_20.json", "case_3.json"]
    assert _same_metrics(cases["case_11.json"]["post"], R.case_metrics(mt, recs[1], skip_generation=True, accuracy=True))
    assert cases["case_11.json"]["edits"] == 4 and cases["case_11.json"]["chunk"] == 1
    mt.model.get_parameter(next(iter(orig))).data.copy_(orig[next(iter(orig))])
    assert _same_metrics(cases["case_11.json"]["pre"], R.case_metrics(mt, recs[1], skip_generation=True, accuracy=True))
    assert not list(full.glob("chunk_*/case_*.json"))
    # the final metrics by the batch that edited the record: each batch here is one record
    from rome_fast.eval import metrics as M
    by_batch = R.summarize(full, print_table=False)["post_by_batch"]
    assert [(b["batch"], b["n"]) for b in by_batch] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    own = M.counterfact_case_scores(cases["case_11.json"]["post"])
    assert all(by_batch[1][k]["mean"] == pytest.approx(100 * own[k]) for k in ("ES", "PS", "NS"))
    # the collapse monitor: one record per batch
    mon = json.loads((full / "monitor.json").read_text())
    assert [b["batch"] for b in mon["batches"]] == [0, 1, 2, 3] and [b["edits"] for b in mon["batches"]] == [1, 2, 3, 4]
    assert set(mon["batches"][0]) == {"batch", "edits", "update_norm", "kl", "ngram_entropy", "seconds"}
    assert list(mon["batches"][0]["update_norm"]) == ["model.layers.1.mlp.down_proj.weight"]
    assert mon["batches"][0]["update_norm"]["model.layers.1.mlp.down_proj.weight"] > 0 and mon["batches"][0]["kl"] > 0
    assert mon["probe_prompts"] and (full / "monitor.png").stat().st_size > 0
    # killed in chunk 2, resumed: the same files and the same final state
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, None, part, editor=HashEditor(fail_on_call=3), **kw)
    assert _same(mt.model, original)
    R.evaluate(mt, "counterfact", recs, None, part, editor=HashEditor(), **kw)
    assert _same(mt.model, original)
    assert _final(part) == _final(full)
    assert torch.equal(load_file(str(chunk_dir(part, 3) / "state.safetensors"))[
        "weights.model.layers.1.mlp.down_proj.weight"], final)
    strip = lambda m: [{**b, "seconds": None} for b in m["batches"]]  # noqa: E731
    assert strip(json.loads((part / "monitor.json").read_text())) == strip(mon)
    # extended by one more batch (a larger --limit): every record is measured again, after 5 edits
    R.evaluate(mt, "counterfact", _records(tmp_path), None, part, editor=HashEditor(), **kw)
    assert _same(mt.model, original)
    assert {c["edits"] for c in _final(part).values()} == {5} and len(_final(part)) == 5
    # a resume on a model whose original weights differ is refused, the model left alone
    bad = tmp_path / "bad"
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, None, bad, editor=HashEditor(fail_on_call=3), **kw)
    with torch.no_grad():
        mt.adapter.rewrite_weight(1)[0, 0] += 1.0
    changed = _snapshot(mt.model)
    with pytest.raises(ValueError, match="original weights differ"):
        R.evaluate(mt, "counterfact", recs, None, bad, editor=HashEditor(), **kw)
    assert _same(mt.model, changed)
    mt.model.load_state_dict(original)
    (chunk_dir(bad, 1) / "state.safetensors").unlink()
    with pytest.raises(ValueError, match="cannot resume"):
        R.evaluate(mt, "counterfact", recs, None, bad, editor=HashEditor(), **kw)
    assert _same(mt.model, original)


def test_stop_on_collapse_restores_the_weights(mt, tmp_path):
    recs = _records(tmp_path)[:4]
    original = _snapshot(mt.model)
    kw = dict(method="memit", num_edits=1, sequential=True, skip_generation=True, progress=False,
              stop_on_collapse=0.0, eval_every=1)
    s = R.evaluate(mt, "counterfact", recs, None, tmp_path / "c", editor=HashEditor(), **kw)
    assert _same(mt.model, original)
    assert s["stopped_on_collapse"]["batch"] == 0 and s["stopped_on_collapse"]["kl"] > 0
    mon = json.loads((tmp_path / "c" / "monitor.json").read_text())
    assert len(mon["batches"]) == 1 and mon["stopped"]["batch"] == 0
    again = HashEditor()   # a rerun does not go on editing past the collapse
    assert R.evaluate(mt, "counterfact", recs, None, tmp_path / "c", editor=again, **kw)["stopped_on_collapse"]
    assert again.calls == 0 and _same(mt.model, original)
    # without the stop, eval_every=1 measures the records edited so far in each chunk's folder
    R.evaluate(mt, "counterfact", recs, None, tmp_path / "e", editor=HashEditor(),
               **{**kw, "stop_on_collapse": None, "pre": False})
    after = sorted(p.relative_to(tmp_path / "e").as_posix() for p in (tmp_path / "e").glob("chunk_*/after/*.json"))
    assert after == ["chunk_00000/after/case_3.json", "chunk_00001/after/case_11.json",
                     "chunk_00001/after/case_3.json", "chunk_00002/after/case_11.json",
                     "chunk_00002/after/case_12.json", "chunk_00002/after/case_3.json"]
    assert R.summarize(tmp_path / "e", print_table=False)["pre"] == {}
    with pytest.raises(ValueError, match="--sequential"):
        R.evaluate(mt, "counterfact", recs, None, tmp_path / "x", editor=HashEditor(),
                   **{**kw, "sequential": False})


@pytest.mark.slow
def test_alphaedit_sequential_run_resumes_to_the_same_weights_and_keys(mt, tmp_path):
    """The real AlphaEdit editor, 3 batches of 2; killed in the third, resumed from the second's
    saved state (weights and accumulated keys): bitwise the same end state as one run."""
    import torch as _t
    from safetensors.torch import load_file
    from rome_fast.edit.alphaedit import AlphaEditHyperParams
    from rome_fast.edit.memit import MEMITHyperParams
    from rome_fast.models.random_init import random_texts
    recs = _records(tmp_path)   # chunks [3, 11], [12, 20], [100]
    base = MEMITHyperParams.for_model(mt.model, layers=[1, 2])
    hp = AlphaEditHyperParams(**{**base.to_dict(), "v_num_grad_steps": 3, "mom2_n_samples": 300,
                                 "nullspace_threshold": 1e9})   # keep every direction: P = I
    original = _snapshot(mt.model)
    ekw = dict(corpus=list(random_texts()), progress=False)
    kw = dict(method="alphaedit", num_edits=2, sequential=True, skip_generation=True, progress=False,
              editor_kwargs=ekw)
    R.evaluate(mt, "counterfact", recs, hp, tmp_path / "full", **kw)
    assert _same(mt.model, original)

    class Killed(ChunkEditor):
        calls = 0

        def __call__(self, mt_, requests, scratch=None):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().__call__(mt_, requests, scratch)

    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, hp, tmp_path / "part",
                   editor=Killed("alphaedit", hp, sequential=True, **ekw), **kw)
    assert _same(mt.model, original)
    assert sorted(p.name for p in (tmp_path / "part").glob("chunk_*")) == ["chunk_00000"]
    R.evaluate(mt, "counterfact", recs, hp, tmp_path / "part", **kw)
    assert _same(mt.model, original)
    a = load_file(str(chunk_dir(tmp_path / "full", 2) / "state.safetensors"))
    b = load_file(str(chunk_dir(tmp_path / "part", 2) / "state.safetensors"))
    assert sorted(a) == sorted(b) and {"editor.cache_c.1", "editor.cache_c.2"} <= set(a)
    assert all(_t.equal(a[k], b[k]) for k in a)
    assert _final(tmp_path / "part") == _final(tmp_path / "full")


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_memit_chunks_on_a_tiny_model(mt, tmp_path, method):
    """The real editor: MEMIT or AlphaEdit (fast) in chunks of 2 (each from the original model;
    AlphaEdit from no accumulated keys), statistics from an in-memory corpus."""
    from rome_fast.edit.alphaedit import AlphaEditHyperParams
    from rome_fast.edit.memit import MEMITHyperParams
    from rome_fast.models.random_init import random_texts
    recs = _records(tmp_path)[:4]
    hp = dataclasses.replace(MEMITHyperParams.for_model(mt.model, layers=[1, 2]), v_num_grad_steps=3,
                             mom2_update_weight=1.0, mom2_n_samples=300)
    if method == "alphaedit":
        hp = AlphaEditHyperParams(**{**hp.to_dict(), "nullspace_threshold": 1e9})
    original = _snapshot(mt.model)
    s = R.evaluate(mt, "counterfact", recs, hp, tmp_path / "m", method=method, num_edits=2, skip_generation=True,
                   progress=False, editor_kwargs=dict(corpus=list(random_texts()), progress=False))
    assert _same(mt.model, original)
    assert s["chunks"]["method"] == method and s["chunks"]["edits"] == 4 and s["chunks"]["chunks"] == 2
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert run["hparams"]["mom2_update_weight"] == 1.0 and run["num_edits"] == 2
    post = [json.loads(p.read_text())["post"] for p in (tmp_path / "m").glob("chunk_*/case_*.json")]
    pre = [json.loads(p.read_text())["pre"] for p in (tmp_path / "m").glob("chunk_*/case_*.json")]
    assert post != pre
    assert "edits in 2 chunk(s)" in R.format_summary(s)


def test_memit_chunk_resumes_its_z_step(mt, tmp_path, monkeypatch):
    """A chunk killed during its z step resumes it from the chunk's scratch folder (only the
    missing groups are optimised), ends with the uninterrupted run's case files, counts the
    earlier z time in the chunk's edit time, and leaves no scratch folder behind."""
    from rome_fast.edit.memit import MEMITHyperParams, fast_z
    from rome_fast.models.random_init import random_texts
    recs = _records(tmp_path)[:4]
    hp = dataclasses.replace(MEMITHyperParams.for_model(mt.model, layers=[1, 2]), v_num_grad_steps=3,
                             mom2_update_weight=1.0, mom2_n_samples=300)
    kw = dict(method="memit", num_edits=4, skip_generation=True, progress=False,
              editor_kwargs=dict(corpus=list(random_texts()), progress=False, z_batch=1))
    original = _snapshot(mt.model)
    R.evaluate(mt, "counterfact", recs, hp, tmp_path / "full", **kw)
    calls = FailOnCall(monkeypatch, fast_z, "_optimise_group", at=3)
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, hp, tmp_path / "part", **kw)
    assert _same(mt.model, original)
    assert len(list((tmp_path / "part" / ".partial_00000").glob("z_*.safetensors"))) == 2
    R.evaluate(mt, "counterfact", recs, hp, tmp_path / "part", **kw)
    assert calls.calls == 5 and _same(mt.model, original)  # the two groups no file held
    assert not (tmp_path / "part" / ".partial_00000").exists()
    # one request per group in both runs: the same computations, so the same numbers exactly
    assert _no_time(_cases(tmp_path / "part")) == _no_time(_cases(tmp_path / "full"))
    meta = json.loads((chunk_dir(tmp_path / "part", 0) / "chunk.json").read_text())
    first = json.loads((chunk_dir(tmp_path / "full", 0) / "chunk.json").read_text())
    assert meta["edit_seconds"] > 0 and first["edit_seconds"] > 0


def test_single_edit_case_files_unchanged(mt, tmp_path):
    """The default protocol still writes case_{id}.json at the top, without the accuracies."""
    recs = _records(tmp_path)[:1]
    R.evaluate(mt, "counterfact", recs, None, tmp_path / "one", editor=lambda m, r: (lambda: None),
               skip_generation=True, progress=False)
    case = json.loads((tmp_path / "one" / "case_3.json").read_text())
    assert set(case) == {"case_id", "requested_rewrite", "time", "post", "pre"}
    assert not any(k.endswith("_correct") for k in case["post"])


def test_cli_parses_mass_editing_options():
    from rome_fast.cli import build_parser
    a = build_parser().parse_args(["eval", "--out", "x", "--method", "memit", "--num-edits", "100",
                                   "--sequential", "--generation-interval", "10"])
    assert (a.method, a.num_edits, a.sequential, a.generation_interval) == ("memit", 100, True, 10)
    assert build_parser().parse_args(["eval", "--out", "x"]).num_edits is None
    a = build_parser().parse_args(["eval", "--out", "x", "--method", "alphaedit", "--num-edits", "100", "--sequential",
                                   "--eval-every", "5", "--stop-on-collapse", "0.5", "--skip-pre"])
    assert (a.method, a.eval_every, a.stop_on_collapse, a.skip_pre) == ("alphaedit", 5, 0.5, True)
    assert build_parser().parse_args(["edit", "--method", "alphaedit", "--requests", "r.json"]).method == "alphaedit"


def _rome_hp(mt):
    from rome_fast.edit import ROMEHyperParams
    return dataclasses.replace(ROMEHyperParams.for_model(mt.model, layer=1), v_num_grad_steps=3, mom2_n_samples=300,
                               context_template_length_params=[[4, 3]])


def test_rome_resumes_after_its_last_finished_request(mt, tmp_path, monkeypatch):
    """ROME one by one with the weights saved after each request: killed in the third of four,
    the weights are put back; the next call loads the two saved edits, applies the last two and
    ends with the weights of one uninterrupted `apply_rome_to_model` call (bitwise). A progress
    file of other requests is refused."""
    from rome_fast.edit import apply_rome_to_model, restore_weights, rome_checkpoint
    from rome_fast.edit.fast import FAST
    from rome_fast.models.random_init import random_texts
    hp = _rome_hp(mt)
    reqs = [r.request() for r in _records(tmp_path)[:4]]
    kw = dict(corpus=list(random_texts()), progress=False)
    original = _snapshot(mt.model)
    _, orig = apply_rome_to_model(mt.model, mt.tokenizer, reqs, hp, return_orig_weights=True, **kw)
    want = {n: mt.model.get_parameter(n).detach().clone() for n in orig}
    restore_weights(mt.model, orig)
    calls = FailOnCall(monkeypatch, FAST, "edit", at=3)  # one call per request
    with pytest.raises(KeyboardInterrupt):
        rome_checkpoint.apply_rome_resumable(mt.model, mt.tokenizer, reqs, hp, tmp_path / "p", **kw)
    assert _same(mt.model, original)
    info = {}
    before = rome_checkpoint.apply_rome_resumable(mt.model, mt.tokenizer, reqs, hp, tmp_path / "p",
                                                  return_info=info, **kw)
    assert calls.calls == 5 and info["resumed_requests"] == 2 and info["resumed_seconds"] > 0
    assert all(torch.equal(mt.model.get_parameter(n), w) for n, w in want.items())
    assert all(torch.equal(before[n], original[n]) for n in before)
    restore_weights(mt.model, before)
    with pytest.raises(ValueError, match="progress of another edit"):
        rome_checkpoint.apply_rome_resumable(mt.model, mt.tokenizer, reqs[:3], hp, tmp_path / "p", **kw)
    with pytest.raises(ValueError, match="progress of another edit"):  # statistics of another corpus
        rome_checkpoint.apply_rome_resumable(mt.model, mt.tokenizer, reqs, hp, tmp_path / "p",
                                             **dict(kw, corpus=kw["corpus"][:-1]))
    assert _same(mt.model, original)


def test_sequential_rome_run_resumed_in_a_new_process(mt, tmp_path, monkeypatch):
    """A sequential ROME run killed in the middle of its second batch and resumed with the
    template caches emptied (a new process): the context templates still come from the unedited
    model, the batch resumes after its last finished request, and the run ends with bitwise the
    uninterrupted run's weights and case files."""
    from safetensors.torch import load_file
    from rome_fast.edit import templates as T
    from rome_fast.edit.fast import FAST
    from rome_fast.models.random_init import random_texts
    hp = _rome_hp(mt)
    recs = _records(tmp_path)[:4]
    kw = dict(method="rome", num_edits=2, sequential=True, skip_generation=True, progress=False,
              editor_kwargs=dict(corpus=list(random_texts()), progress=False))
    original = _snapshot(mt.model)
    R.evaluate(mt, "counterfact", recs, hp, tmp_path / "full", **kw)
    calls = FailOnCall(monkeypatch, FAST, "edit", at=4)  # one call per request
    T.clear_cache()
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, hp, tmp_path / "part", **kw)
    assert _same(mt.model, original)
    assert (tmp_path / "part" / ".partial_00001" / "rome_progress.safetensors").is_file()
    T.clear_cache()
    R.evaluate(mt, "counterfact", recs, hp, tmp_path / "part", **kw)
    assert calls.calls == 5 and _same(mt.model, original)  # only the fourth request was left
    a = load_file(str(chunk_dir(tmp_path / "full", 1) / "state.safetensors"))
    b = load_file(str(chunk_dir(tmp_path / "part", 1) / "state.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _final(tmp_path / "part") == _final(tmp_path / "full")
    assert not (tmp_path / "part" / ".partial_00001").exists()


def test_summary_of_a_run_still_editing(mt, tmp_path, capsys):
    """`rome-fast eval-summary` on a sequential run stopped after its first of two batches says
    where it stands (batches done of all, edits, what is measured, the monitor's last batch)
    instead of failing for want of final case files; a folder of no run still fails."""
    from rome_fast.cli import main
    recs = _records(tmp_path)[:4]
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, None, tmp_path / "run", editor=HashEditor(fail_on_call=2), method="memit",
                   num_edits=2, sequential=True, skip_generation=True, progress=False)
    capsys.readouterr()
    assert main(["eval-summary", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "memit run in progress" in out and "sequential batches of up to 2 edits done: 1 of 2; 2 edits" in out
    assert "measured: 4 records before any edit, 0 after the last batch" in out
    kl = json.loads((chunk_dir(tmp_path / "run", 0) / "chunk.json").read_text())["monitor"]["kl"]
    assert f"after batch 0 (2 edits): KL {kl:.4g}" in out
    (tmp_path / "empty").mkdir()
    assert main(["eval-summary", str(tmp_path / "empty")]) == 2
    assert "no case_*.json files" in capsys.readouterr().err
