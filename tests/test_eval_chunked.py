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
    mt.model.get_parameter(next(iter(orig))).data.copy_(orig[next(iter(orig))])
    # killed in chunk 2, resumed: the same files and the same final state
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        R.evaluate(mt, "counterfact", recs, None, part, editor=HashEditor(fail_on_call=3), **kw)
    assert _same(mt.model, original)
    R.evaluate(mt, "counterfact", recs, None, part, editor=HashEditor(), **kw)
    assert _same(mt.model, original)
    assert _no_time(_cases(part)) == _no_time(_cases(full))
    assert torch.equal(load_file(str(chunk_dir(part, 3) / "state.safetensors"))[
        "weights.model.layers.1.mlp.down_proj.weight"], final)
    seq = _cases(full)
    assert seq["chunk_00001/case_11.json"]["pre"] != R.case_metrics(mt, recs[1], skip_generation=True, accuracy=True)
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


def test_memit_chunks_on_a_tiny_model(mt, tmp_path):
    """The real editor: MEMIT (fast) in chunks of 2, statistics from an in-memory corpus."""
    from rome_fast.edit.memit import MEMITHyperParams
    from rome_fast.models.random_init import random_texts
    recs = _records(tmp_path)[:4]
    hp = dataclasses.replace(MEMITHyperParams.for_model(mt.model, layers=[1, 2]), v_num_grad_steps=3,
                             mom2_update_weight=1.0, mom2_n_samples=300)
    original = _snapshot(mt.model)
    s = R.evaluate(mt, "counterfact", recs, hp, tmp_path / "m", method="memit", num_edits=2, skip_generation=True,
                   progress=False, editor_kwargs=dict(corpus=list(random_texts()), progress=False))
    assert _same(mt.model, original)
    assert s["chunks"]["method"] == "memit" and s["chunks"]["edits"] == 4 and s["chunks"]["chunks"] == 2
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert run["hparams"]["mom2_update_weight"] == 1.0 and run["num_edits"] == 2
    post = [json.loads(p.read_text())["post"] for p in (tmp_path / "m").glob("chunk_*/case_*.json")]
    pre = [json.loads(p.read_text())["pre"] for p in (tmp_path / "m").glob("chunk_*/case_*.json")]
    assert post != pre
    assert "edits in 2 chunk(s)" in R.format_summary(s)


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
