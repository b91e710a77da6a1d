"""The GPU suite (benchmarks/gpu_suite.sh, docs/gpu.md) in its CPU quick mode, so it cannot rot
between the sessions that are lent a GPU: the script runs end to end on tiny models, writes its
few files under $OUT, evaluates every target and profiles; its deadline skips steps cleanly; the
results file makes the README table."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bench  # noqa: E402
import gpu_table  # noqa: E402


def _suite(out: Path, *args, timeout=240):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(SUITE), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite-out")
    proc = _suite(out, "--cpu-quick")
    return out, proc


@pytest.mark.slow  # shares one quick run of the suite (~25 s)
def test_quick_mode_runs_end_to_end(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_cpu-quick.json", "gpu_suite.log", "gpu_table.md", "parts.tar.gz"]  # <= 8 come back
    log = (out / "gpu_suite.log").read_text()
    assert "=== [bench_quick] rc=0 in " in log and "every step passed" in log
    with tarfile.open(out / "parts.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"steps.jsonl", "trace_gpt2-xl.json", "trace_raw_gpt2-xl.json", "update.json"} <= names


@pytest.mark.slow  # shares one quick run of the suite (~25 s)
def test_quick_results_have_every_target_and_profile(quick_run):
    out, _ = quick_run
    res = json.loads((out / "gpu_cpu-quick.json").read_text())
    assert res["suite"]["mode"] == "cpu-quick"
    assert [t["name"] for t in res["targets"]] == list(gpu_bench.TARGETS)
    for t in res["targets"]:  # every target measured and judged against its value
        assert t["status"] in ("met", "missed") and isinstance(t["measured"], float), t
        assert t["met"] == (t["measured"] >= t["target"] if t["op"] == ">=" else t["measured"] <= t["target"])
    assert set(res["benchmarks"]) == {"trace_gpt2-xl", "edit_gpt2-xl", "update", "stats_gpt2-xl", "trace_llama-7b"}
    for name, part in res["benchmarks"].items():
        assert "error" not in part, (name, part.get("error"))
        assert part["rows"] and part["profile"]["top_ops"], name  # --profile always in quick mode
    # the fidelity figures are real comparisons even here: fast = reference on the CPU
    by = {t["name"]: t for t in res["targets"]}
    assert by["trace_fp32_max_dscore"]["met"] and by["edit_max_rel_diff"]["met"]
    steps = {s["step"]: s for s in res["steps"]}
    assert steps["bench_quick"]["rc"] == 0 and steps["bench_quick"]["timed_out"] is False
    assert "skipped" in steps["tests"] and "skipped" in steps["build"]
    assert res["tests"]["ran"] is False


@pytest.mark.slow  # shares one quick run of the suite (~25 s)
def test_table_lists_each_target(quick_run):
    out, _ = quick_run
    table = (out / "gpu_table.md").read_text()
    for label, *_ in gpu_bench.TARGETS.values():
        assert f"| {label} |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert all(line.count(" | ") == rows[0].count(" | ") for line in rows[:len(gpu_bench.TARGETS) + 1])
    res = json.loads((out / "gpu_cpu-quick.json").read_text())
    assert gpu_table.table(res) == table


def test_deadline_skips_steps_and_still_writes_results(tmp_path):
    """A budget too small for any step: each is skipped and recorded, the results file says
    'not measured' for every target, and the suite fails."""
    proc = _suite(tmp_path, "--cpu-quick", "--budget", "40", timeout=120)
    assert proc.returncode == 1
    assert "SKIPPED" in proc.stdout and "FAILED or skipped steps: bench_quick(skipped)" in proc.stdout
    res = json.loads((tmp_path / "gpu_cpu-quick.json").read_text())
    assert {t["status"] for t in res["targets"]} == {"not measured"}
    assert res["summary"] == {"met": 0, "missed": 0, "not_measured": len(gpu_bench.TARGETS)}
    assert "out of suite time" in next(s for s in res["steps"] if s["step"] == "bench_quick")["skipped"]


def test_bad_invocations_are_one_clear_line(tmp_path):
    proc = _suite(tmp_path, "--bogus", timeout=30)
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
    proc = _suite(tmp_path, "--budget", "soon", timeout=30)
    assert proc.returncode == 2 and "--budget takes whole seconds" in proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "set OUT" in proc.stderr
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", str(SUITE)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def test_targets_are_judged_both_ways():
    assert gpu_bench.target("trace_fp32_speedup", 8.0)["status"] == "met"
    assert gpu_bench.target("trace_fp32_speedup", 7.9)["status"] == "missed"
    assert gpu_bench.target("trace_1209x3_bf16_minutes", 9.5)["status"] == "met"
    assert gpu_bench.target("trace_1209x3_bf16_minutes", 10.5)["status"] == "missed"
    for bad in (None, float("nan"), float("inf")):
        t = gpu_bench.target("edit_speedup", bad)
        assert t["status"] == "not measured" and t["met"] is None and t["measured"] is None


def test_merge_of_nothing_and_a_failed_step(tmp_path):
    (tmp_path / "edit_gpt2-xl.json").write_text(json.dumps(
        {"step": "edit", "model": "gpt2-xl", "error": "RuntimeError: CUDA out of memory", "rows": []}))
    res = gpu_bench.merge(tmp_path, tmp_path / "r.json", "gpu")
    assert res["summary"]["not_measured"] == len(gpu_bench.TARGETS)
    assert res["tests"]["ran"] is False and res["steps"] == []
    table = gpu_table.table(json.loads((tmp_path / "r.json").read_text()))
    assert "failed: RuntimeError: CUDA out of memory" in table
    # MEMIT's own file (benchmarks/memit_gpu.py) is carried along and tabled
    (tmp_path / "memit_gpu.json").write_text(json.dumps({"model": "random GPT-J-shaped", "rows": [
        {"edits": 100, "backend": "reference", "seconds": {"setup": 1.0, "z": 20.0, "layers": 4.0, "total": 25.0},
         "speedup": 3.2, "rel_diff_update_max": 2e-6}]}))
    res = gpu_bench.merge(tmp_path, tmp_path / "r.json", "gpu")
    assert res["memit"]["memit_gpu"]["rows"][0]["edits"] == 100
    assert "| memit_gpu | random GPT-J-shaped | 100 | reference | 1 s | 20 s | 4 s | 25 s | 3.2x | 2.0e-06 |" \
        in gpu_table.table(res)
    (tmp_path / "bad.json").write_text("{not json")
    assert gpu_table.main([str(tmp_path / "bad.json")]) == 2


STUB = """#!/usr/bin/env bash
# python3 on a GPU machine, stood in for: records each call; the build, the tests and the
# benchmarks pretend (one test fails), merge and table run for real
echo "ARCH=${ROME_FAST_CUDA_ARCH:-} JOBS=${MAX_JOBS:-} CUDA=${ROME_FAST_CUDA:-} $*" >>"$CALLS"
case "$1" in
    -) cat >/dev/null; printf 'ARCH=90a\\nSLUG=fake-h200\\n' >"$2/env.sh"
       echo '{"device_name": "Fake H200"}' >"$2/env.json" ;;
    -m) for a in "$@"; do case "$a" in --junitxml=*) cat >"${a#--junitxml=}" <<'XML'
<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0"><testcase classname="tests.t" name="a"/>
<testcase classname="tests.t" name="b"><failure message="boom: 2e-3 &gt; 1e-4"/></testcase>
<testcase classname="tests.t" name="c"/></testsuite></testsuites>
XML
       esac; done; exit 1 ;;
    benchmarks/gpu_bench.py) [ "$2" = merge ] && exec "$REAL" "$@"; exit 0 ;;
    benchmarks/gpu_table.py) exec "$REAL" "$@" ;;
esac
exit 0
"""


def test_gpu_branch_dry_run(tmp_path):
    """The GPU branch of the script, which CI cannot run, with python stood in for: every step runs
    in order with the device's architecture and all cores, a failed test step is recorded and the
    suite goes on, and the junit file reaches the results."""
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(stub), CALLS=str(calls), REAL=sys.executable)
    env.pop("ROME_FAST_CUDA_ARCH", None)
    proc = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "FAILED or skipped steps: tests" in proc.stdout, proc.stdout[-3000:]
    lines = calls.read_text().splitlines()
    build = next(line for line in lines if "setup.py build_ext --inplace" in line)
    assert build.startswith(f"ARCH=90a JOBS={len(os.sched_getaffinity(0))} CUDA=1 ")
    assert any("-m pytest -m cuda tests" in line for line in lines)
    ran = [line.split()[-1] for line in lines if "benchmarks/gpu_bench.py --parts" in line and "merge" not in line]
    assert ran == ["trace:gpt2-xl", "edit:gpt2-xl", "update", "stats:gpt2-xl", "trace:llama-7b"]
    res = json.loads((tmp_path / "out" / "gpu_fake-h200.json").read_text())
    steps = [s["step"] for s in res["steps"]]
    assert steps[:9] == ["env", "build", "core", "tests", "trace_gpt2-xl", "edit_gpt2-xl", "update",
                         "stats_gpt2-xl", "trace_llama-7b"]
    assert res["tests"]["passed"] == 2 and res["tests"]["failures"] == 1
    assert res["tests"]["failed"] == [{"test": "tests.t::b", "message": "boom: 2e-3 > 1e-4"}]
    assert res["env"]["device_name"] == "Fake H200"
