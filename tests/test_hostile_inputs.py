"""Hostile and careless input (docs/security.md): crafted result files run no code, ids cannot write
outside the output folder, a reused folder with other input is refused, unreadable case files are
computed again, and every bad input is one error line naming the file or argument."""
import json
import os

import numpy as np
import pytest

from rome_fast.cli import main
from rome_fast.eval import datasets as D
from rome_fast.eval import runner as eval_runner
from rome_fast.files import file_id, inside
from rome_fast.trace import commands as trace_commands
from rome_fast.trace.aggregate import case_path
from rome_fast.trace.api import calculate_hidden_flow
from rome_fast.trace.results import ResultFileError, TraceResult

from cf_cases import COMPACT_CASES

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
           ("Miles Davis plays the", "Miles Davis")]
ARGS = ["--model", "tiny:gpt2", "--samples", "2", "--kind", "hidden", "--no-progress", "--backend", "reference"]


@pytest.fixture(scope="module")
def facts_file(make_facts_file):
    return make_facts_file("tiny:gpt2", PROMPTS, first_id=10)


def _write_facts(path, facts):
    path.write_text(json.dumps(facts))
    return path


def _one_error_line(err: str) -> str:
    """stderr holds one `rome-fast: error:` message and no traceback."""
    assert "Traceback" not in err, err
    assert err.startswith("rome-fast: error: "), err
    return err


# ---- 1. no code runs from a result file --------------------------------------------------------

class _Payload:
    """Unpickling this creates the file `target`: the proof that code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _reference_layout(**override):
    """What the reference's `np.savez(filename, **numpy_result)` writes for a hidden-state trace:
    plain arrays, strings as unicode arrays, and kind=None, which NumPy can only store pickled."""
    rng = np.random.default_rng(0)
    fields = dict(scores=rng.random((5, 4), dtype=np.float32), low_score=np.float32(0.1),
                  high_score=np.float32(0.5), input_ids=np.arange(5), input_tokens=["a", "b", "c", "d", "e"],
                  subject_range=(1, 3), answer=" Paris", window=10, correct_prediction=True, kind=None)
    fields.update(override)
    return fields


@pytest.mark.parametrize("field", ["scores", "kind", "answer"])
def test_pickled_result_file_runs_no_code(tmp_path, field, capsys):
    marker = tmp_path / "CODE_RAN"
    payload = np.array(_Payload(marker), dtype=object) if field != "scores" else \
        np.array([_Payload(marker)], dtype=object)
    out = tmp_path / "run"
    (out / "cases").mkdir(parents=True)
    evil = out / "cases" / "knowledge_7.npz"
    np.savez(evil, **_reference_layout(**{field: payload}))
    with pytest.raises(ResultFileError, match="pickled Python objects") as info:
        TraceResult.load(evil)
    assert str(evil) in str(info.value)
    assert main(["aggregate", str(out), "--no-figures"]) == 2  # the command that loads every case
    err = _one_error_line(capsys.readouterr().err)
    assert "knowledge_7.npz" in err and "delete it" in err
    assert not marker.exists()


def test_merge_copies_no_pickled_file(tmp_path, facts_file, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert main(["trace", "--facts", str(facts_file), "--out", str(src), *ARGS]) == 0
    marker = tmp_path / "CODE_RAN"
    np.savez(src / "cases" / "knowledge_99.npz",
             **_reference_layout(scores=np.array([_Payload(marker)], dtype=object)))
    capsys.readouterr()
    assert main(["aggregate", str(dst), "--merge", str(src), "--no-figures"]) == 0
    assert "knowledge_99.npz" in capsys.readouterr().err and not marker.exists()
    assert sorted(p.name for p in (dst / "cases").iterdir()) == ["knowledge_10.npz", "knowledge_11.npz"]


def test_reference_layout_still_loads(tmp_path):
    """The reference's files (kind=None pickled, strings, tuples) load, kind by kind."""
    path = tmp_path / "knowledge_3.npz"
    np.savez(path, **_reference_layout())
    r = TraceResult.load(path)
    assert r.kind in ("", None) and r.subject_range == (1, 3) and r.answer == " Paris"
    assert r.input_tokens == ["a", "b", "c", "d", "e"] and r.correct_prediction
    np.savez(tmp_path / "knowledge_3_mlp.npz", **_reference_layout(kind="mlp"))
    assert TraceResult.load(tmp_path / "knowledge_3_mlp.npz").kind == "mlp"
    # an object array that is None in its header but carries more in its pickle is refused
    np.savez(tmp_path / "odd.npz", **_reference_layout(kind=np.array([None, None], dtype=object)))
    with pytest.raises(ResultFileError, match="pickled"):
        TraceResult.load(tmp_path / "odd.npz")


@pytest.mark.parametrize("protocol, numpy1", [(2, True), (3, True), (2, False), (3, False), (4, False), (5, False)])
def test_reference_none_kind_in_every_pickle_protocol(tmp_path, protocol, numpy1):
    """NumPy 1 and 2 and every pickle protocol spell the pickled None differently; each is
    recognised from its opcodes, and the report reads the file too."""
    import io
    import pickle
    import zipfile
    from rome_fast.report.runs import Warnings, read_trace
    path = tmp_path / "knowledge_1.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key, value in _reference_layout().items():
            buf, array = io.BytesIO(), np.asarray(value)
            if array.dtype.hasobject:  # what np.save writes, in the protocol under test
                np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
                raw = pickle.dumps(array, protocol=protocol)
                if numpy1:  # the reference ran on NumPy 1, whose module was numpy.core
                    raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
                    assert b"numpy.core.multiarray" in raw
                buf.write(raw)
            else:
                np.lib.format.write_array(buf, array)
            z.writestr(key + ".npy", buf.getvalue())
    assert TraceResult.load(path).subject_range == (1, 3)
    warnings = Warnings()
    assert read_trace(path, warnings) is not None and warnings == []


def test_saving_refuses_what_only_pickle_could_store(tmp_path):
    r = TraceResult.load(_saved(tmp_path))
    r.answer = object()
    with pytest.raises(ValueError, match="numbers and strings only"):
        r.save(tmp_path / "again.npz")


def _saved(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, **_reference_layout(kind="mlp"))
    return path


# ---- 2. ids cannot write outside --out ---------------------------------------------------------

def test_traversal_known_id_is_refused_and_nothing_escapes(tmp_path, facts_file, capsys):
    facts = json.loads(facts_file.read_text())
    facts[1]["known_id"] = "q/../../../ESCAPED"
    bad = _write_facts(tmp_path / "facts.json", facts)
    out = tmp_path / "a" / "b" / "out"
    assert main(["trace", "--facts", str(bad), "--out", str(out), *ARGS]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "record 1" in err and "known_id" in err and "ESCAPED" in err
    assert [p for p in tmp_path.rglob("*ESCAPED*")] == []
    # with --skip-bad the good fact is traced, the bad one is listed, nothing escapes
    assert main(["trace", "--facts", str(bad), "--out", str(out), "--skip-bad", *ARGS]) == 0
    assert [p for p in tmp_path.rglob("*ESCAPED*")] == []
    skipped = json.loads((out / "summary.json").read_text())["skipped_records"]
    assert [s["record"] for s in skipped] == [1] and skipped[0]["known_id"] == "q/../../../ESCAPED"
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["knowledge_10.npz"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "-rf", True, -1, 1.5, None, ["1"]])
def test_unsafe_ids_make_no_file_names(tmp_path, bad):
    with pytest.raises(ValueError, match="known_id must be"):
        case_path(tmp_path, bad)
    with pytest.raises(ValueError, match="case_id must be a non-negative integer"):
        eval_runner.case_path(tmp_path, bad)
    assert case_path(tmp_path, 7).name == "knowledge_7.npz"
    assert case_path(tmp_path, "P17_a-1.b", "mlp").name == "knowledge_P17_a-1.b_mlp.npz"
    assert file_id(0) == "0"
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(tmp_path / "out", tmp_path / "out" / ".." / "elsewhere")


# ---- 3. a reused --out holds the same input ----------------------------------------------------

def test_reused_out_with_other_facts_is_refused(tmp_path, facts_file, capsys):
    out = tmp_path / "run"
    assert main(["trace", "--facts", str(facts_file), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    facts = json.loads(facts_file.read_text())
    other = [dict(facts[0], prompt="Eiffel Tower stands in the city of", subject="Eiffel Tower")]
    other_file = _write_facts(tmp_path / "other.json", other)
    assert main(["trace", "--facts", str(other_file), "--out", str(out), *ARGS]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "facts_sha256" in err and "another output folder" in err
    # without the run's record (an older version's folder), the case file itself is checked
    (out / "run.json").unlink()
    assert main(["trace", "--facts", str(other_file), "--out", str(out), *ARGS]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "knowledge_10.npz holds the trace of another fact" in err


@pytest.fixture(scope="module")
def eval_mt():
    from rome_fast.models import ModelAndTokenizer
    from rome_fast.models.random_init import random_model
    model, tok = random_model("llama", seed=2)
    return ModelAndTokenizer(model=model, tokenizer=tok)


def _no_edit(mt, request):
    return lambda: None


def test_eval_refuses_other_data_and_redoes_unreadable_cases(tmp_path, eval_mt, capsys):
    data = _write_facts(tmp_path / "cf.json", COMPACT_CASES[:2])
    out = tmp_path / "eval"
    kw = dict(editor=_no_edit, progress=False, skip_generation=True)
    eval_runner.evaluate(eval_mt, "counterfact", data, None, out, **kw)
    assert "data_sha256" in json.loads((out / "run.json").read_text())
    # another data file into the same folder: refused by its hash
    other = json.loads(data.read_text())
    other[0]["target_new"] = "Berlin" if other[0]["target_new"] != "Berlin" else "Rome"
    other_file = _write_facts(tmp_path / "other.json", other)
    with pytest.raises(ValueError, match="data_sha256"):
        eval_runner.evaluate(eval_mt, "counterfact", other_file, None, out, **kw)
    # records passed without their file: each case file is checked to hold the same request
    with pytest.raises(ValueError, match="holds another request"):
        eval_runner.evaluate(eval_mt, "counterfact", D.load_counterfact(other_file), None, out, **kw)
    # a truncated case file is evaluated again, and the run says so
    first = eval_runner.case_path(out, COMPACT_CASES[0]["case_id"])
    good = first.read_text()
    first.write_text(good[:40])
    capsys.readouterr()
    eval_runner.evaluate(eval_mt, "counterfact", data, None, out, **kw)
    assert f"{first} does not load" in capsys.readouterr().err
    assert json.loads(first.read_text())["requested_rewrite"] == json.loads(good)["requested_rewrite"]


# ---- 6. a truncated case file is traced again --------------------------------------------------

def test_truncated_case_file_is_traced_again(tmp_path, facts_file, capsys):
    out = tmp_path / "run"
    assert main(["trace", "--facts", str(facts_file), "--out", str(out), *ARGS]) == 0
    case = out / "cases" / "knowledge_11.npz"
    whole = TraceResult.load(case)
    case.write_bytes(case.read_bytes()[:300])
    capsys.readouterr()
    assert main(["trace", "--facts", str(facts_file), "--out", str(out), *ARGS]) == 0
    err = capsys.readouterr().err
    assert str(case) in err and "tracing it again" in err
    again = TraceResult.load(case)
    assert again.correct_prediction == whole.correct_prediction
    if whole.scores is not None:
        np.testing.assert_array_equal(again.scores.numpy(), whole.scores.numpy())


# ---- 7, 8. prompts the trace cannot use; noise that measures nothing --------------------------

def test_prompt_longer_than_the_context(tiny_model):
    mt = tiny_model("gpt2")
    limit = mt.adapter.context_length
    prompt = "Paris " * (limit + 5) + "is in"
    with pytest.raises(ValueError, match=rf"longer than the model's context of {limit} tokens"):
        calculate_hidden_flow(mt, prompt, "Paris", samples=1, kind="hidden")


@pytest.mark.parametrize("prompt, subject, noise, message", [
    ("The Eiffel Tower is in", "Eiffel Tower", 0.0, "noise level must be a finite number > 0"),
    ("The Eiffel Tower is in", "Eiffel Tower", float("nan"), "finite number"),
    ("The Eiffel Tower is in", "Eiffel Tower", float("inf"), "finite number"),
    ("The Eiffel Tower is in", " Eiffel Tower", 0.1, "surrounding whitespace"),
    ("The Eiffel Tower is in", "Eiffel Tower ", 0.1, "surrounding whitespace"),
    ("The", "The", 0.1, "single token"),
])
def test_inputs_that_would_give_nan_or_nonsense(tiny_model, prompt, subject, noise, message):
    with pytest.raises(ValueError, match=message):
        calculate_hidden_flow(tiny_model("gpt2"), prompt, subject, samples=1, noise=noise, kind="hidden")


def test_nan_from_a_noise_function(tiny_model):
    with pytest.raises(ValueError, match="NaN or infinite"):
        calculate_hidden_flow(tiny_model("gpt2"), "The Eiffel Tower is in", "Eiffel Tower", samples=1,
                              noise=lambda x: x * float("nan"), kind="hidden")


# ---- 9. models that cannot be loaded ----------------------------------------------------------

def _tiny_folder(tmp_path):
    from rome_fast.models.random_init import random_model
    model, tok = random_model("llama", seed=1)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_unloadable_models_are_one_line(tmp_path, capsys, monkeypatch):
    folder = _tiny_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])  # half-written
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 9)  # a header cut short
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # saving the folder's progress bar
    cases = {str(folder): (str(folder), "half-written or corrupt"),
             str(gguf): (str(gguf), "truncated or corrupt"),
             str(tmp_path / "empty"): ("empty", "no config.json"),
             "./no/such/model": ("./no/such/model", "model path not found"),
             str(tmp_path / "missing"): ("missing", "model path not found"),
             str(weights): ("model.safetensors", "is a file")}
    for spec, (name, why) in cases.items():
        assert main(["trace", "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower",
                     "--model", spec, "--out", str(tmp_path / "o")]) == 2, spec
        err = _one_error_line(capsys.readouterr().err)
        assert name in err and why in err and err.count("\n") == 1, err


def test_unknown_hub_id_is_one_line(monkeypatch, capsys, tmp_path):
    """Offline (HF_HUB_OFFLINE), an id that is not cached fails at once, in one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert main(["trace", "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower",
                 "--model", "no-such-org/no-such-model", "--out", str(tmp_path)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "no-such-org/no-such-model" in err and "check the id" in err and err.count("\n") == 1


# ---- 10, 11. facts files ----------------------------------------------------------------------

def test_facts_file_not_json_or_empty(tmp_path, capsys):
    for text, message in (("{oops", "is not valid JSON"), ("[]", "holds no fact records"),
                          ('{"a": 1}', "expected a JSON list")):
        path = tmp_path / "facts.json"
        path.write_text(text)
        assert main(["trace", "--facts", str(path), "--out", str(tmp_path / "o"), *ARGS]) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert str(path) in err and message in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_every_bad_record_is_named_at_once(tmp_path, facts_file, capsys, monkeypatch):
    facts = json.loads(facts_file.read_text())
    records = [facts[0], dict(facts[1], known_id=[1]), dict(facts[1], known_id=12, prompt=7),
               dict(facts[1], known_id=10), "not a record"]
    path = _write_facts(tmp_path / "facts.json", records)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the facts were checked")

    monkeypatch.setattr(trace_commands, "load_model_spec", no_model)
    assert main(["trace", "--facts", str(path), "--out", str(tmp_path / "o"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err and "--skip-bad" in err
    assert "record 1 (known_id [1]): known_id must be" in err
    assert "record 2 (known_id 12): the prompt must be a non-empty string" in err
    assert "record 0 (known_id 10): duplicate known_id 10 (also record 3)" in err
    assert "record 3 (known_id 10): duplicate known_id 10 (also record 0)" in err
    assert "record 4: expected an object" in err


# ---- 12. small ones ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--threads", "-1"], ["--samples", "0"], ["--window", "x"],
                                   ["--limit", "0"]])
def test_bad_counts_are_usage_errors(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as info:
        main(["trace", "--prompt", "a b", "--subject", "a", "--out", str(tmp_path), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and extra[0] in err and "must be an integer >= 1" in err


@pytest.mark.parametrize("extra, message", [
    (["--noise", "0"], "no noise the subject is not corrupted"),
    (["--noise", "nan"], "finite number > 0"),
    (["--noise", "t1"], "more than 2 degrees of freedom"),
    (["--subject", "Space Needle"], "does not occur"),
    (["--subject", " Eiffel Tower"], "surrounding whitespace"),
])
def test_argument_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(trace_commands, "load_model_spec", no_model)
    args = ["trace", "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower", "--out", str(tmp_path)]
    assert main(args + extra) == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown noise rule"):
        main(["trace", "--prompt", "a b", "--subject", "a", "--noise", "q", "--out", str(tmp_path)])
    assert os.environ["ROME_FAST_DEBUG"] == "1"


def test_text_files_that_are_not_text(tmp_path, capsys):
    binary = tmp_path / "facts.json"
    binary.write_bytes(b"\xff\xfe\x00binary")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    for args, message in ((["--facts", str(binary)], "is not UTF-8 text"),
                          (["--facts", str(deep)], "nested too deeply"),
                          (["--facts", str(tmp_path)], "is a folder"),
                          (["--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower", "--noise", "m",
                            "--noise-corpus", str(blank)], "holds no text")):
        assert main(["trace", *args, "--out", str(tmp_path / "o"), "--model", "tiny:gpt2"]) == 2
        assert message in _one_error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="nested too deeply"):
        D.load_counterfact(deep)


def test_an_unsupported_gguf_is_not_called_corrupt(tmp_path, monkeypatch):
    from rome_fast.models import loading
    from rome_fast.models.families import UnsupportedArchitectureError

    def other_family(path, dtype):
        loading._check_supported(type("Config", (), {"model_type": "mamba"})())

    monkeypatch.setattr(loading, "_load_gguf", other_family)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'mamba'"):
        loading.load_model(str(gguf), device="cpu")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in any command: no traceback, one line, the shell's code for SIGINT."""
    from rome_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    monkeypatch.delenv("ROME_FAST_DEBUG", raising=False)
    assert cli.main(["info"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
