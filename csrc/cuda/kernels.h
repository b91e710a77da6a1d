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
