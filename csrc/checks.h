// Argument checks shared by the ops' kernels (see docs/kernels.md): every bad input is one
// ValueError naming the argument and what it must be, raised before a kernel touches memory.
#pragma once
#include <ATen/ATen.h>

#include <string_view>

#define RF_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "rome_fast: ", __VA_ARGS__)

namespace rome_fast {

// Hidden states [B, T, D] (dim 3) of a storage type the kernels convert to fp32.
inline void check_float_states(const at::Tensor& x, const char* name, int64_t dim) {
  RF_CHECK(x.dim() == dim, name, " must be ", dim, "-D, got shape ", x.sizes());
  RF_CHECK(x.is_contiguous(), name, " must be contiguous");
  const auto st = x.scalar_type();
  RF_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
           " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like,
                              const char* like_name) {
  RF_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
           like.device());
}

inline void check_index(const at::Tensor& idx, const char* name, int64_t n, const at::Tensor& like) {
  RF_CHECK(idx.dim() == 1 && idx.size(0) == n, name, " must be 1-D of length ", n, ", got shape ",
           idx.sizes());
  RF_CHECK(idx.scalar_type() == at::kLong, name, " must be int64, got ", idx.scalar_type());
  check_same_device(idx, name, like, "the states");
  RF_CHECK(idx.is_contiguous(), name, " must be contiguous");
}

// Index values need the host: checked on CPU only. On CUDA a check would cost a device sync per
// call, so there the wrappers in rome_fast/ops build the indices from checked Python values.
inline void check_range(const at::Tensor& idx, const char* name, int64_t lo, int64_t hi) {
  if (!idx.is_cpu() || idx.numel() == 0) return;
  const int64_t mn = idx.min().item<int64_t>(), mx = idx.max().item<int64_t>();
  RF_CHECK(mn >= lo && mx < hi, name, " values must lie in [", lo, ", ", hi, "), got [", mn, ", ",
           mx, "]");
}

// Weight layouts: "in_out" is W [d_k, d_v] (GPT-2 Conv1D), "out_in" is W [d_v, d_k] (nn.Linear).
// Returns true for "in_out".
inline bool parse_layout(std::string_view layout) {
  RF_CHECK(layout == "in_out" || layout == "out_in",
           "layout must be 'in_out' (W is [d_k, d_v], GPT-2 Conv1D) or 'out_in' (W is [d_v, d_k], "
           "nn.Linear), got '", layout, "'");
  return layout == "in_out";
}

// A weight updated in place: 2-D, contiguous, of a storage type.
inline void check_weight(const at::Tensor& W) {
  RF_CHECK(W.dim() == 2, "W must be 2-D, got shape ", W.sizes());
  RF_CHECK(W.is_contiguous(), "W must be contiguous (it is updated in place)");
  const auto st = W.scalar_type();
  RF_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
           "W must be float32, float16 or bfloat16, got ", st);
}

}  // namespace rome_fast
