#!/usr/bin/env bash
# Compiles every CUDA kernel file with a bare `nvcc -c` (no GPU and no CUDA torch needed): the
# kernels include no torch headers, so a broken kernel fails here, on any machine with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "nvcc not found: CUDA compile check skipped"; exit 0; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for cu in csrc/cuda/*.cu; do
  "$NVCC" -c -std=c++17 -O3 -Werror all-warnings -gencode=arch=compute_80,code=sm_80 \
    -gencode=arch=compute_90a,code=sm_90a "$cu" -o "$out/$(basename "$cu").o"
  echo "nvcc ok: $cu"
done
