// CUDA kernels for causal tracing: per-row noise and per-row restore of clean states.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype_utils.cuh"

namespace rome_fast::cuda {
namespace {

using detail::dispatch;
using detail::from_f;
using detail::to_f;

// One block per (noise row, subject token); threads stride over the hidden dimension.
template <typename T>
__global__ void add_noise_kernel(T* __restrict__ x, const float* __restrict__ noise,
                                 const int64_t* __restrict__ rows, const int64_t* __restrict__ starts,
                                 const int64_t* __restrict__ lengths, int64_t L, int64_t T_len,
                                 int64_t D, bool replace) {
  const int64_t i = blockIdx.x, n = i / L, l = i % L;
  if (l >= lengths[n]) return;
  T* dst = x + (rows[n] * T_len + starts[n] + l) * D;
  const float* src = noise + i * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    dst[d] = replace ? from_f<T>(src[d]) : from_f<T>(to_f(dst[d]) + src[d]);
}

// One block per batch row; a row with token < 0 restores nothing. Copies 16-byte words when the
// row is aligned for them (the common case: D a multiple of 8 halves / 4 floats).
template <typename T>
__global__ void restore_rows_kernel(T* __restrict__ x, const T* __restrict__ clean,
                                    const int64_t* __restrict__ row_fact,
                                    const int64_t* __restrict__ row_tok, int64_t T_len,
                                    int64_t Tc, int64_t D) {
  const int64_t b = blockIdx.x, t = row_tok[b];
  if (t < 0) return;
  T* dst = x + (b * T_len + t) * D;
  const T* src = clean + (row_fact[b] * Tc + t) * D;
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  if (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    auto* d4 = reinterpret_cast<int4*>(dst);
    const auto* s4 = reinterpret_cast<const int4*>(src);
    for (int64_t k = threadIdx.x; k < bytes / 16; k += blockDim.x) d4[k] = s4[k];
  } else {
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) dst[k] = src[k];
  }
}

}  // namespace

// The launchers (declared for the dispatcher in register.cpp): device pointers, `stream` a
// cudaStream_t, a cudaError_t returned as int. Inputs are checked before they are called.

// x[rows[n], starts[n] + l] (+)= noise[n, l] for l < lengths[n]; x [B, T, D] of `dtype`,
// noise [N, L, D] fp32.
int add_noise(void* x, const float* noise, const int64_t* rows, const int64_t* starts,
              const int64_t* lengths, int64_t N, int64_t L, int64_t T, int64_t D, bool replace,
              DType dtype, void* stream) {
  if (N * L == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    add_noise_kernel<S><<<static_cast<unsigned>(N * L), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<S*>(x), noise, rows, starts, lengths, L, T, D, replace);
    return static_cast<int>(cudaGetLastError());
  });
}

// x[b, row_tok[b]] = clean[row_fact[b], row_tok[b]] where row_tok[b] >= 0; x [B, T, D], clean
// [F, Tc, D], both of `dtype`.
int restore_rows(void* x, const void* clean, const int64_t* row_fact, const int64_t* row_tok,
                 int64_t B, int64_t T, int64_t Tc, int64_t D, DType dtype, void* stream) {
  if (B == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    restore_rows_kernel<S><<<static_cast<unsigned>(B), 128, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<S*>(x), static_cast<const S*>(clean), row_fact, row_tok, T, Tc, D);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace rome_fast::cuda
