#!/usr/bin/env bash
# Checks the CUDA side of the compiled core on a machine without a GPU (docs/kernels.md):
#   1. every kernel file csrc/cuda/*.cu with a bare `nvcc -c` and setup.py's nvcc flags: the
#      kernels include no torch header;
#   2. the files built only with ROME_FAST_WITH_CUDA (csrc/cuda/register.cpp, the dispatcher
#      registration of the CUDA kernels, and csrc/module.cpp) with the C++ compiler and setup.py's
#      flags against a CUDA build of torch's headers: only `torch/include/` of the torch wheel that
#      `pip download` finds (ROME_FAST_CUDA_TORCH, default torch==2.14.1), extracted to a temp dir;
#   3. that every rome_fast function register.cpp calls is defined, with the same signature, by a
#      kernel object or by the built CPU core (rome_fast/_C*.so).
# Outside CI a missing nvcc, wheel or CPU core is a skip with one line; with CI=true, a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
CUDA_TORCH=${ROME_FAST_CUDA_TORCH:-torch==2.14.1}
CXX=${CXX:-c++}

in_ci() { [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; }
unavailable() {
  if in_ci; then echo "FAIL (CI): $1" >&2; exit 1; fi
  echo "SKIP: $1"; exit 0
}
# setup.py's flag lists (one definition for the build and this check)
flags() {
  "$PY" - "$1" <<'EOF'
import os, runpy, sys
m = runpy.run_path("setup.py", run_name="flags")
archs = os.environ.get("ROME_FAST_CUDA_ARCH", m["DEFAULT_CUDA_ARCHS"])
print(" ".join({"nvcc": m["NVCC_FLAGS"] + [m["CUDA_DEFINE"]] + m["gencode_flags"](archs),
                "cxx": m["CXX_FLAGS"] + [m["CUDA_DEFINE"]]}[sys.argv[1]]))
EOF
}

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || unavailable "nvcc not found (set NVCC or put it on PATH): CUDA compile check not run"
# where nvcc itself lives (it may be a wrapper script): the CUDA headers are beside it
CUDA_HOME=${CUDA_HOME:-$(dirname "$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 |
  sed -n 's/^#\$ _HERE_=//p' | head -n 1)")}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. kernels
read -r -a nvcc_flags <<<"$(flags nvcc)"
echo "nvcc flags (setup.py's): ${nvcc_flags[*]}"
for cu in csrc/cuda/*.cu; do
  "$NVCC" -c "${nvcc_flags[@]}" -Werror all-warnings "$cu" -o "$out/$(basename "$cu").o"
  echo "nvcc ok: $cu"
done

# 2. the ROME_FAST_WITH_CUDA side, against a CUDA torch's headers
"$PY" -m pip download -q --no-deps "$CUDA_TORCH" -d "$out/wheel" >"$out/pip.log" 2>&1 ||
  unavailable "pip download $CUDA_TORCH failed ($(tail -n 1 "$out/pip.log")): registration not compiled"
wheel=$(ls "$out"/wheel/torch-*.whl)
"$PY" - "$wheel" "$out/torch" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("torch/include/")])
EOF
rm -rf "$out/wheel"
inc=$out/torch/torch/include
[ -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ] ||
  unavailable "$(basename "$wheel") is not a CUDA build of torch: registration not compiled"
read -r -a cxx_flags <<<"$(flags cxx)"
py_inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
for src in csrc/cuda/register.cpp csrc/module.cpp; do
  "$CXX" -c -fPIC "${cxx_flags[@]}" -Werror -Wall -Wno-unknown-pragmas -isystem "$inc" \
    -isystem "$inc/torch/csrc/api/include" -isystem "$CUDA_HOME/include" -isystem "$py_inc" \
    "$src" -o "$out/$(basename "$src").o"
  echo "$CXX ok (ROME_FAST_WITH_CUDA, $(basename "$wheel" | cut -d- -f1-2) headers): $src"
done

rm -rf "$out/torch"

# 3. what register.cpp calls is defined with the same (mangled) signature
core=$(ls rome_fast/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$core" ] && [ "${ROME_FAST_NO_EXT:-0}" = 1 ]; then
  echo "SKIP: ROME_FAST_NO_EXT=1, no CPU core to check register.cpp's calls against"; exit 0
fi
[ -n "$core" ] || unavailable "rome_fast/_C*.so is not built: register.cpp's calls into it not checked"
nm --undefined-only "$out/register.cpp.o" | awk '{print $2}' | grep '^_ZN9rome_fast' | sort -u \
  >"$out/needed"
{ nm --defined-only "$out"/*.cu.o; nm -D --defined-only "$core"; } | awk '{print $3}' |
  grep '^_ZN9rome_fast' | sort -u >"$out/defined"
missing=$(comm -23 "$out/needed" "$out/defined")
if [ -n "$missing" ]; then
  echo "register.cpp calls functions that no kernel object or $core defines with that signature:" >&2
  echo "$missing" | c++filt >&2
  exit 1
fi
echo "symbols ok: the $(wc -l <"$out/needed") rome_fast functions register.cpp calls are defined"
echo "CUDA compile check passed in $((SECONDS - start)) s"
