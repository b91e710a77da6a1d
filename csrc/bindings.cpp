// The only binding file of rome_fast's compiled core: input checks with clear messages, then
// dispatch to the CPU implementation or the CUDA launcher (raw pointers + current stream).
#include <torch/extension.h>

#include "cpu/cpu_ops.h"
#ifdef ROME_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "cuda/kernels.h"
#endif

namespace {

#define RF_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "rome_fast: ", __VA_ARGS__)

void check_float_states(const torch::Tensor& x, const char* name, int64_t dim) {
  RF_CHECK(x.dim() == dim, name, " must be ", dim, "-D, got shape ", x.sizes());
  RF_CHECK(x.is_contiguous(), name, " must be contiguous");
  const auto st = x.scalar_type();
  RF_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
           " must be float32, float16 or bfloat16, got ", st);
}

void check_index(const torch::Tensor& idx, const char* name, int64_t n, const torch::Tensor& like) {
  RF_CHECK(idx.dim() == 1 && idx.size(0) == n, name, " must be 1-D of length ", n, ", got shape ",
           idx.sizes());
  RF_CHECK(idx.scalar_type() == at::kLong, name, " must be int64, got ", idx.scalar_type());
  RF_CHECK(idx.device() == like.device(), name, " is on ", idx.device(), " but the states are on ",
           like.device());
  RF_CHECK(idx.is_contiguous(), name, " must be contiguous");
}

// Value checks need the host; on CUDA the Python layer checks before upload and kernels stay fast.
void check_range(const torch::Tensor& idx, const char* name, int64_t lo, int64_t hi) {
  if (!idx.is_cpu() || idx.numel() == 0) return;
  const int64_t mn = idx.min().item<int64_t>(), mx = idx.max().item<int64_t>();
  RF_CHECK(mn >= lo && mx < hi, name, " values must lie in [", lo, ", ", hi, "), got [", mn, ", ",
           mx, "]");
}

#ifdef ROME_FAST_WITH_CUDA
rome_fast::cuda::DType cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return rome_fast::cuda::DType::kFloat16;
    case at::kBFloat16: return rome_fast::cuda::DType::kBFloat16;
    default: return rome_fast::cuda::DType::kFloat32;
  }
}
void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "rome_fast: CUDA kernel ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

void add_noise_(torch::Tensor x, torch::Tensor noise, torch::Tensor rows, torch::Tensor starts,
                torch::Tensor lengths, bool replace) {
  check_float_states(x, "x", 3);
  RF_CHECK(noise.dim() == 3 && noise.scalar_type() == at::kFloat && noise.is_contiguous(),
           "noise must be a contiguous float32 tensor [N, L, D], got ", noise.scalar_type(), " ",
           noise.sizes());
  RF_CHECK(noise.size(2) == x.size(2), "noise width ", noise.size(2), " != hidden size ", x.size(2));
  RF_CHECK(noise.device() == x.device(), "noise is on ", noise.device(), ", x on ", x.device());
  const int64_t N = noise.size(0), L = noise.size(1);
  check_index(rows, "rows", N, x);
  check_index(starts, "starts", N, x);
  check_index(lengths, "lengths", N, x);
  check_range(rows, "rows", 0, x.size(0));
  check_range(lengths, "lengths", 0, L + 1);
  if (x.is_cpu() && N > 0) {
    RF_CHECK((starts >= 0).all().item<bool>() && ((starts + lengths) <= x.size(1)).all().item<bool>(),
             "noise span starts[n] + lengths[n] runs past the sequence length ", x.size(1));
  }
  if (x.is_cpu()) return rome_fast::cpu::add_noise_(x, noise, rows, starts, lengths, replace);
#ifdef ROME_FAST_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(rome_fast::cuda::add_noise(x.data_ptr(), noise.data_ptr<float>(),
                                          rows.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                          lengths.data_ptr<int64_t>(), N, L, x.size(1), x.size(2),
                                          replace, cuda_dtype(x.scalar_type()),
                                          at::cuda::getCurrentCUDAStream().stream()),
               "add_noise");
#else
  TORCH_CHECK(false, "rome_fast: x is on ", x.device(), " but the extension was built without CUDA");
#endif
}

void restore_rows_(torch::Tensor x, torch::Tensor clean, torch::Tensor row_fact,
                   torch::Tensor row_tok) {
  check_float_states(x, "x", 3);
  check_float_states(clean, "clean", 3);
  RF_CHECK(clean.scalar_type() == x.scalar_type(), "clean dtype ", clean.scalar_type(),
           " != states dtype ", x.scalar_type());
  RF_CHECK(clean.device() == x.device(), "clean is on ", clean.device(), ", x on ", x.device());
  RF_CHECK(clean.size(2) == x.size(2), "clean width ", clean.size(2), " != hidden size ", x.size(2));
  const int64_t B = x.size(0);
  check_index(row_fact, "row_fact", B, x);
  check_index(row_tok, "row_tok", B, x);
  check_range(row_fact, "row_fact", 0, clean.size(0));
  check_range(row_tok, "row_tok", -1, std::min(x.size(1), clean.size(1)));
  if (x.is_cpu()) return rome_fast::cpu::restore_rows_(x, clean, row_fact, row_tok);
#ifdef ROME_FAST_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(rome_fast::cuda::restore_rows(x.data_ptr(), clean.data_ptr(),
                                             row_fact.data_ptr<int64_t>(), row_tok.data_ptr<int64_t>(),
                                             B, x.size(1), clean.size(1), x.size(2),
                                             cuda_dtype(x.scalar_type()),
                                             at::cuda::getCurrentCUDAStream().stream()),
               "restore_rows");
#else
  TORCH_CHECK(false, "rome_fast: x is on ", x.device(), " but the extension was built without CUDA");
#endif
}

bool has_cuda() {
#ifdef ROME_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rome_fast compiled core (CPU, and CUDA when built with it)";
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");
  m.def("add_noise_", &add_noise_, "x[rows[n], starts[n]+l] (+)= noise[n, l] for l < lengths[n]",
        py::arg("x"), py::arg("noise"), py::arg("rows"), py::arg("starts"), py::arg("lengths"),
        py::arg("replace") = false);
  m.def("restore_rows_", &restore_rows_,
        "x[b, row_tok[b]] = clean[row_fact[b], row_tok[b]] for every row with row_tok[b] >= 0",
        py::arg("x"), py::arg("clean"), py::arg("row_fact"), py::arg("row_tok"));
}
