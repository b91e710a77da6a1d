"""Scale-out under torchrun on CPU (gloo): a K-process run writes the same files as one process,
a rank that dies loses only its unfinished work, and a rerun with any K finishes the rest.

The torchrun runs are real subprocesses (`python -m torch.distributed.run`, loopback only), with
OMP_NUM_THREADS=1 (several processes share few cores) and no visible GPU (so gloo on CPU even on a
GPU machine, and the same device as the one-process baseline)."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rome_fast import distributed
from rome_fast.cli import main

from cf_cases import COMPACT_CASES

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower"),
           ("Miles Davis plays the", "Miles Davis"),
           ("The Louvre is a museum in", "The Louvre"),
           ("Toyota is headquartered in", "Toyota"),
           ("Berlin is the capital of", "Berlin"),
           ("The Space Needle is in", "The Space Needle"),
           ("Apple was founded by", "Apple"),
           ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux")]
TRACE_ARGS = ["--model", "tiny:llama", "--samples", "2", "--no-progress"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ROME_FAST_FAIL") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                              "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, nproc=None, check=True, **env):
    """`python -m rome_fast ARGS` alone (nproc None) or under torchrun with nproc processes."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())]
    cmd += ["-m", "rome_fast", *args]
    p = subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=240)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def _npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def assert_same_trace(a: Path, b: Path):
    names = sorted(p.name for p in (a / "cases").glob("*.npz"))
    assert names == sorted(p.name for p in (b / "cases").glob("*.npz"))
    for name in names:
        x, y = _npz(a / "cases" / name), _npz(b / "cases" / name)
        assert x.keys() == y.keys(), name
        for k in x:  # the same bits, not merely close
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), f"{name}:{k}"
    assert (a / "summary.json").read_text() == (b / "summary.json").read_text()


def mtimes(folder: Path):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------
# The helpers alone

def test_env_info_shard_and_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    info = distributed.env_info()
    assert (info.rank, info.world, info.is_main, info.distributed) == (0, 1, True, False)
    assert distributed.init() == info  # alone: starts nothing
    try:
        distributed.barrier()
        assert distributed.broadcast({"x": 1}) == {"x": 1}
        assert distributed.shard(list(range(5))) == [0, 1, 2, 3, 4]
    finally:
        distributed.finalize()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    info = distributed.env_info()
    assert (info.rank, info.world, info.is_main) == (2, 3, False)
    shares = [distributed.shard(list(range(8)), distributed.DistInfo(rank=r, world=3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        distributed.env_info()


def test_failure_hook(monkeypatch):
    monkeypatch.delenv(distributed.FAIL_RANK_ENV, raising=False)
    assert distributed.failure_hook("batch", distributed.DistInfo()) is None
    monkeypatch.setenv(distributed.FAIL_RANK_ENV, "1")
    monkeypatch.setenv(distributed.FAIL_AFTER_ENV, "2")
    assert distributed.failure_hook("batch", distributed.DistInfo(rank=0, world=2)) is None
    tick = distributed.failure_hook("batch", distributed.DistInfo(rank=1, world=2))
    tick()
    with pytest.raises(distributed.InjectedFailure, match="after 2 batch"):
        tick()


# ---------------------------------------------------------------------------------------------
# Tracing

@pytest.fixture(scope="module")
def facts_file(make_facts_file):
    """16 facts (the prompts twice): 4 fast batches of 4 on a CPU, 2 per rank with 2 processes. The
    expected attribute is the tiny model's own prediction, except for fact 2 (mispredicted)."""
    return make_facts_file("tiny:llama", PROMPTS, wrong={2}, copies=2)


@pytest.fixture(scope="module")
def trace_baseline(facts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "one"
    run_cli(["trace", "--facts", str(facts_file), "--out", str(out), *TRACE_ARGS])
    assert len(list((out / "cases").glob("*.npz"))) == 48
    return out


def test_two_processes_write_the_files_of_one(facts_file, trace_baseline, tmp_path):
    out = tmp_path / "two"
    p = run_cli(["trace", "--facts", str(facts_file), "--out", str(out), *TRACE_ARGS], nproc=2)
    assert_same_trace(trace_baseline, out)
    assert p.stdout.count("correct, ATE") == 3  # the summary is printed by rank 0 only
    assert json.loads((out / "run.json").read_text()) == json.loads((trace_baseline / "run.json").read_text())
    assert not [p.name for p in (out / "cases").iterdir() if p.name.startswith(".")]  # no temp files left


def test_dead_rank_loses_only_its_unfinished_batches(facts_file, trace_baseline, tmp_path):
    out = tmp_path / "broken"
    args = ["trace", "--facts", str(facts_file), "--out", str(out), *TRACE_ARGS]
    p = run_cli(args, nproc=2, check=False, ROME_FAST_FAIL_RANK="1", ROME_FAST_FAIL_AFTER="1")
    assert p.returncode != 0 and "failing on purpose after 1 batch" in p.stdout + p.stderr
    done = mtimes(out / "cases")
    # rank 1's first batch is on disk, its second never started (rank 0 may or may not have
    # finished before torchrun stopped it); no aggregate was made
    assert 12 <= len(done) < 48 and len(done) % 3 == 0
    assert not (out / "summary.json").exists()

    p = run_cli(args, nproc=2)  # the rerun finishes the rest, recomputing nothing
    assert_same_trace(trace_baseline, out)
    now = mtimes(out / "cases")
    assert {k: now[k] for k in done} == done


def test_rank_shares_are_whole_batches(facts_file, tmp_path, monkeypatch):
    """Each rank's fast share is batches[rank::world] of the one-process split (so every fact is
    computed in the same company, with the same padding), and rank 1 checks rank 0's run.json."""
    from rome_fast.trace import many, runner
    from rome_fast.trace.commands import load_model_spec
    mt = load_model_spec("tiny:llama")
    facts = runner.load_facts(facts_file)
    seen = {}
    monkeypatch.setattr(many, "trace_facts_batched", lambda *a, batches, **k: seen.setdefault("b", batches))
    whole = many.fact_batches(mt, facts, 4)
    assert sorted(i for b in whole for i in b) == list(range(16))
    for rank in (1, 0):  # rank 1 first: it must find no run.json
        monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=rank, world=2))
        seen.clear()
        if rank == 1:
            with pytest.raises(RuntimeError, match="must be shared by all ranks"):
                runner.trace_facts(mt, facts, tmp_path, samples=2, progress=False)
            continue
        assert runner.trace_facts(mt, facts, tmp_path, samples=2, progress=False, figures=False) == {}
        assert seen["b"] == whole[0::2]
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=1, world=2))
    seen.clear()
    assert runner.trace_facts(mt, facts, tmp_path, samples=2, progress=False) is None
    assert seen["b"] == whole[1::2]


def test_refused_settings_stop_every_rank(facts_file, trace_baseline, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(trace_baseline, out)
    p = run_cli(["trace", "--facts", str(facts_file), "--out", str(out), *TRACE_ARGS, "--noise", "s2"],
                nproc=2, check=False)
    assert p.returncode != 0
    assert "other settings" in p.stderr and "rank 1: rank 0 refused the run" in p.stdout + p.stderr


def test_aggregate_merges_separate_runs(trace_baseline, tmp_path, capsys):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    files = sorted((trace_baseline / "cases").glob("*.npz"))
    for part, chosen in ((a, files[::2]), (b, files[1::2])):
        (part / "cases").mkdir(parents=True)
        shutil.copy(trace_baseline / "run.json", part)
        for f in chosen:
            shutil.copy(f, part / "cases")
    assert main(["aggregate", str(merged), "--merge", str(a), str(b), "--no-figures"]) == 0
    assert "24 case files copied" in capsys.readouterr().out
    assert json.loads((merged / "summary.json").read_text()) == json.loads((trace_baseline / "summary.json").read_text())
    # a run with other settings is not merged in
    other = json.loads((a / "run.json").read_text())
    (b / "run.json").write_text(json.dumps({**other, "samples": 3}))
    assert main(["aggregate", str(merged), "--merge", str(b)]) == 2
    assert "other settings" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Evaluation (the real ROME editor on the tiny model: statistics of a small synthetic corpus)

@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    import dataclasses

    from rome_fast.edit import ROMEHyperParams
    from rome_fast.trace.commands import load_model_spec
    d = tmp_path_factory.mktemp("eval-in")
    hp = ROMEHyperParams.for_model(load_model_spec("tiny:llama").model, layer=1)
    dataclasses.replace(hp, v_num_grad_steps=4, mom2_n_samples=200,
                        context_template_length_params=[[4, 2]]).to_json(d / "hp.json")
    rng = random.Random(0)
    words = "the of a city river king music film born france paris london war book team played year".split()
    (d / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))
                                              for _ in range(200)))
    (d / "cf.json").write_text(json.dumps(COMPACT_CASES))
    return d


def eval_args(d: Path, out: Path, stats: Path):
    return ["eval", "--data", str(d / "cf.json"), "--out", str(out), "--model", "tiny:llama",
            "--hparams", str(d / "hp.json"), "--corpus", str(d / "corpus.txt"), "--stats-dir", str(stats)]


def read_cases(out: Path):
    return {p.name: {**json.loads(p.read_text()), "time": None} for p in sorted(out.glob("case_*.json"))}


def test_eval_shards(eval_inputs, tmp_path):
    d = eval_inputs
    one, two, broken = tmp_path / "one", tmp_path / "two", tmp_path / "broken"
    run_cli(eval_args(d, one, tmp_path / "stats1") + ["--quiet"])
    expected = read_cases(one)
    assert sorted(expected) == ["case_11.json", "case_12.json", "case_20.json", "case_3.json"]

    p = run_cli(eval_args(d, two, tmp_path / "stats2"), nproc=2)
    assert read_cases(two) == expected
    assert p.stdout.count("edit time") == 1  # one summary table, from rank 0
    s1, s2 = (json.loads((o / "summary.json").read_text()) for o in (one, two))
    for s in (s1, s2):
        s.pop("time"), s.pop("dir")
    assert s1 == s2
    # rank 0 edited first, so the statistics were computed once, into one file
    assert len(list((tmp_path / "stats2").rglob("*.npz"))) == 1

    # rank 1 dies after its first case; a one-process rerun finishes without redoing any case
    p = run_cli(eval_args(d, broken, tmp_path / "stats2") + ["--quiet"], nproc=2, check=False,
                ROME_FAST_FAIL_RANK="1", ROME_FAST_FAIL_AFTER="1")
    assert p.returncode != 0 and "failing on purpose after 1 case" in p.stdout + p.stderr
    assert (broken / "case_11.json").is_file() and not (broken / "case_20.json").exists()
    before = {k: v for k, v in mtimes(broken).items() if k.startswith("case_")}
    run_cli(eval_args(d, broken, tmp_path / "stats2") + ["--quiet"])
    assert read_cases(broken) == expected
    assert {k: mtimes(broken)[k] for k in before} == before
