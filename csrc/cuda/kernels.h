// Launchers of the CUDA kernels. Plain C++ types only (no torch, no CUDA headers), so this header
// is shared by bindings.cpp and the .cu files, and the .cu files compile with a bare `nvcc -c`.
#pragma once
#include <cstdint>

namespace rome_fast::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// All pointers are device pointers; `stream` is a cudaStream_t. Return a cudaError_t as int.
int add_noise(void* x, const float* noise, const int64_t* rows, const int64_t* starts,
              const int64_t* lengths, int64_t N, int64_t L, int64_t T, int64_t D, bool replace,
              DType dtype, void* stream);

int restore_rows(void* x, const void* clean, const int64_t* row_fact, const int64_t* row_tok,
                 int64_t B, int64_t T, int64_t Tc, int64_t D, DType dtype, void* stream);

}  // namespace rome_fast::cuda

// ---- Solve + rank-k weight update (rank_one_kernels.cu) ----
namespace rome_fast::cuda {

// W[r, c] += sum_k A[r, k] * B[c, k] in place; W [rows, cols] row-major of `dtype`, A [rows, n]
// and B [cols, n] fp32 row-major. fp32 sums, one rounding per W element.
int rank_k_update(void* W, const float* A, const float* B, int64_t rows, int64_t cols, int64_t n,
                  DType dtype, void* stream);

// Per column j of Y [d, n] (fp64 when y_is_double, else fp32): U[:, j] = Y[:, j] / ||Y[:, j]||
// (fp32), stats [3, n] fp64 = (||Y[:, j]||, <kstar[:, j], Y[:, j]>, ||kstar[:, j]||).
int normalize_dot(const void* Y, bool y_is_double, const float* kstar, float* U, double* stats,
                  int64_t d, int64_t n, void* stream);

}  // namespace rome_fast::cuda

// ---- Fused block pieces (block_kernels.cu) ----
namespace rome_fast::cuda {

// out [B, H, T, hd] = x·cos + rotate_half(x)·sin per head of x [B, T, H·hd]; cos/sin [B, T, hd]
// (or [1, T, hd] with cos_broadcast). All of `dtype`, contiguous.
int rope_heads(const void* x, const void* cos, const void* sin, void* out, int64_t B, int64_t T,
               int64_t H, int64_t hd, bool cos_broadcast, DType dtype, void* stream);

}  // namespace rome_fast::cuda
