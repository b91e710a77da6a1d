#!/usr/bin/env bash
# The GPU suite, in one call (docs/gpu.md): on a bare GPU machine, build the CUDA core against the
# installed torch, run every CUDA-marked test, run the GPU benchmarks, and leave under $OUT
#   gpu_<device>.json  every result and each target met / missed (benchmarks/gpu_table.py reads it)
#   gpu_table.md       the README table built from it
#   gpu_suite.log      everything printed, each step's wall time
#   parts.tar.gz       the raw per-step files (the junit XML of the tests among them)
# Each step has a time limit and the suite a deadline (--budget, default 420 s), so one slow step
# cannot eat the rest; a failed step is recorded and the suite goes on.
#
#   OUT=/path/to/empty/dir bash benchmarks/gpu_suite.sh              # on the GPU machine
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh --cpu-quick            # tiny models on the CPU (CI)
#   OUT=... bash benchmarks/gpu_suite.sh --steps trace_gpt2-xl,merge  # a rerun of some steps
set -uo pipefail
export PYTHONUNBUFFERED=1

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --cpu-quick | --steps a,b,... | --budget SECONDS | --help"
    echo "steps: env build core tests trace_gpt2-xl edit_gpt2-xl update stats_gpt2-xl trace_llama-7b memit memit_reference (merge and table always run)"
}

MODE=gpu
SELECTED=""
BUDGET=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-quick) MODE=cpu-quick ;;
        --steps) SELECTED=${2:-}; shift ;;
        --budget) BUDGET=${2:-}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${OUT:-}" ]; then
    echo "gpu_suite.sh: set OUT to the folder for the results (it is created if missing)" >&2
    exit 2
fi
case "$BUDGET" in
    "") BUDGET=$([ "$MODE" = gpu ] && echo 420 || echo 240) ;;
    *[!0-9]*) echo "gpu_suite.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone obeys OMP_NUM_THREADS
PARTS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX") || exit 2
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=30   # kept for merge, table and archive
MIN_STEP=20  # a step with less time than this left is skipped
FAILED=()

ms_now() { date +%s%N | cut -c1-13; }

record() {  # step rc seconds limit timed_out [skipped-reason]
    if [ -n "${6:-}" ]; then
        printf '{"step": "%s", "skipped": "%s"}\n' "$1" "$6" >>"$PARTS/steps.jsonl"
    else
        printf '{"step": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "timed_out": %s}\n' \
            "$1" "$2" "$3" "$4" "$5" >>"$PARTS/steps.jsonl"
    fi
}

selected() {  # env always runs: the other GPU steps need what it finds
    [ -z "$SELECTED" ] || [ "$1" = env ] && return 0
    case ",$SELECTED," in *",$1,"*) return 0 ;; esac
    return 1
}

# run_step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (the smaller of LIMIT_S and the time
# left before the deadline), prints and records its wall time and exit status; never stops the suite.
run_step() {
    local name=$1 limit=$2 left t0 ms rc timed_out
    shift 2
    if ! selected "$name"; then
        record "$name" 0 0 0 false "not selected (--steps)"
        return 0
    fi
    left=$((DEADLINE - $(date +%s) - RESERVE))
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "=== [$name] SKIPPED: ${left}s left of the suite's ${BUDGET}s budget"
        record "$name" 0 0 0 false "out of suite time (${left}s left)"
        FAILED+=("$name(skipped)")
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== [$name] start at +$(($(date +%s) - START))s, limit ${limit}s: $*"
    t0=$(ms_now)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    ms=$(($(ms_now) - t0))
    timed_out=false
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then timed_out=true; fi
    local secs
    secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    echo "=== [$name] rc=$rc in ${secs}s$([ "$timed_out" = true ] && echo " (TIMED OUT at ${limit}s)")"
    record "$name" "$rc" "$secs" "$limit" "$timed_out"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    return 0
}

skip_step() {  # NAME REASON
    echo "=== [$1] skipped: $2"
    record "$1" 0 0 0 false "$2"
}

suite() {
    echo "gpu_suite.sh: mode $MODE, budget ${BUDGET}s, $CORES cores, python $PY, parts in $PARTS"
    git log -1 --format='tree at commit %h (%cd): %s' 2>/dev/null
    git status --porcelain 2>/dev/null | head -20 | sed 's/^/  uncommitted: /'
    local BENCH=(benchmarks/gpu_bench.py --parts "$PARTS")
    local SLUG=cpu-quick
    if [ "$MODE" = gpu ]; then
        # the device: what it is, the architecture to build for, the results' name; nothing is changed
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
        command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
        command -v nvcc >/dev/null && nvcc --version | tail -2
        run_step env 60 "$PY" - "$PARTS" <<'PYEOF'
import json, re, shutil, subprocess, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}: run with --cpu-quick on a machine without a GPU")
major, minor = torch.cuda.get_device_capability()
arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a: Hopper's own instructions
name = torch.cuda.get_device_name()
slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"
nvcc = shutil.which("nvcc")
env = dict(device_name=name, capability=[major, minor], arch=arch, slug=slug, torch=torch.__version__,
           torch_cuda=torch.version.cuda, nvcc=nvcc and subprocess.run([nvcc, "--version"], capture_output=True,
                                                                       text=True).stdout.strip().splitlines()[-1])
print(json.dumps(env))
open(f"{sys.argv[1]}/env.json", "w").write(json.dumps(env, indent=1))
open(f"{sys.argv[1]}/env.sh", "w").write(f"ARCH={arch}\nSLUG={slug}\n")
PYEOF
        if [ -f "$PARTS/env.sh" ]; then
            # shellcheck disable=SC1091
            . "$PARTS/env.sh"
        else
            echo "gpu_suite.sh: the env step found no usable GPU; the remaining GPU steps are skipped"
            SLUG=no-gpu
        fi
        if [ "$SLUG" != no-gpu ]; then
            ARCH=${ROME_FAST_CUDA_ARCH:-$ARCH}
            run_step build 240 env ROME_FAST_CUDA=1 ROME_FAST_CUDA_ARCH="$ARCH" MAX_JOBS="$CORES" \
                "$PY" setup.py build_ext --inplace
            run_step core 60 "$PY" -c "import json, sys, rome_fast; i = rome_fast.backend_info(); print(json.dumps(i)); sys.exit(0 if i['cuda_ext'] else 'the CUDA core is not loaded')"
            run_step tests 150 "$PY" -m pytest -m cuda tests -q -rfEs -p no:cacheprovider \
                --continue-on-collection-errors --junitxml="$PARTS/pytest_cuda.xml"
            run_step trace_gpt2-xl 200 "$PY" "${BENCH[@]}" trace:gpt2-xl
            run_step edit_gpt2-xl 90 "$PY" "${BENCH[@]}" edit:gpt2-xl
            run_step update 60 "$PY" "${BENCH[@]}" update
            run_step stats_gpt2-xl 60 "$PY" "${BENCH[@]}" stats:gpt2-xl
            run_step trace_llama-7b 90 "$PY" "${BENCH[@]}" trace:llama-7b
            if [ -f benchmarks/memit_gpu.py ]; then
                run_step memit 120 "$PY" benchmarks/memit_gpu.py --edits 100 1000 --out "$PARTS/memit_gpu.json"
                run_step memit_reference 90 "$PY" benchmarks/memit_gpu.py --edits 100 --reference \
                    --out "$PARTS/memit_gpu_reference.json"
            else
                skip_step memit "benchmarks/memit_gpu.py is not in this tree"
            fi
        fi
    else
        skip_step build "CPU quick mode: the tree's own build is used"
        skip_step tests "CPU quick mode: no GPU, so no CUDA-marked test can run"
        # all benchmark steps in one process: start-up dominates at these sizes
        run_step bench_quick 150 "$PY" "${BENCH[@]}" --quick --device cpu --profile always \
            trace:gpt2-xl edit:gpt2-xl update stats:gpt2-xl trace:llama-7b
        if [ -f benchmarks/memit_gpu.py ]; then
            run_step memit 120 "$PY" benchmarks/memit_gpu.py --quick --out "$PARTS/memit_gpu.json"
        else
            skip_step memit "benchmarks/memit_gpu.py is not in this tree"
        fi
    fi

    local RESULTS="$OUT/gpu_$SLUG.json"
    echo "=== [merge] -> $RESULTS"
    timeout 60 "$PY" benchmarks/gpu_bench.py merge --parts "$PARTS" --out "$RESULTS" --mode "$MODE" \
        || FAILED+=(merge)
    if [ -f "$RESULTS" ]; then
        timeout 30 "$PY" benchmarks/gpu_table.py "$RESULTS" >"$OUT/gpu_table.md" || FAILED+=(table)
        cat "$OUT/gpu_table.md"
    fi
    tar -czf "$OUT/parts.tar.gz" -C "$PARTS" . || FAILED+=(archive)
    echo "gpu_suite.sh: done in $(($(date +%s) - START))s of ${BUDGET}s; results in $OUT: $(cd "$OUT" && echo *)"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "gpu_suite.sh: FAILED or skipped steps: ${FAILED[*]}"
        return 1
    fi
    echo "gpu_suite.sh: every step passed"
}

suite 2>&1 | tee "$OUT/gpu_suite.log"
rc=${PIPESTATUS[0]}
rm -rf "$PARTS"
exit "$rc"
