// The storage type of a tensor, as the torch-free CUDA launchers take it (no torch, no CUDA
// headers: included by the .cu files and by register.cpp).
#pragma once
#include <cstdint>

namespace rome_fast::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace rome_fast::cuda
