// The CUDA kernels of rome_fast's ops, for the dispatcher (built with ROME_FAST_WITH_CUDA only).
// Each runs the op's argument checks (defined beside its CPU kernel in csrc/cpu/), selects the
// device, and calls the torch-free launcher of its .cu file on the current stream; the .cu files
// include no torch header, so a bare `nvcc -c` checks them. rome_update_ needs no entry here: it
// is device-generic (csrc/rome_update.cpp). How the pieces fit: docs/kernels.md.
//
// The launchers and checks are declared here, where they are called, rather than in headers, so
// that an op is 4 files; scripts/check_cuda_compile.sh checks that every symbol this file needs
// is defined, with this signature, by the .cu and CPU objects.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string_view>

#include "dtype.h"

namespace rome_fast {

// Argument checks (csrc/cpu/*.cpp).
void check_add_noise_(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& rows,
                      const at::Tensor& starts, const at::Tensor& lengths);
void check_restore_rows_(const at::Tensor& x, const at::Tensor& clean, const at::Tensor& row_fact,
                         const at::Tensor& row_tok);
void check_rank_k_update_(const at::Tensor& W, const at::Tensor& U, const at::Tensor& R,
                          std::string_view layout);
void check_cholesky_solve(const at::Tensor& L, const at::Tensor& B);
void check_normalize_dot(const at::Tensor& Y, const at::Tensor& kstar);
void check_rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      int64_t heads);

namespace cuda {

// Launchers (csrc/cuda/*.cu; contracts there).
int add_noise(void* x, const float* noise, const int64_t* rows, const int64_t* starts,
              const int64_t* lengths, int64_t N, int64_t L, int64_t T, int64_t D, bool replace,
              DType dtype, void* stream);
int restore_rows(void* x, const void* clean, const int64_t* row_fact, const int64_t* row_tok,
                 int64_t B, int64_t T, int64_t Tc, int64_t D, DType dtype, void* stream);
int rank_k_update(void* W, const float* A, const float* B, int64_t rows, int64_t cols, int64_t n,
                  DType dtype, void* stream);
int normalize_dot(const void* Y, bool y_is_double, const float* kstar, float* U, double* stats,
                  int64_t d, int64_t n, void* stream);
int rope_heads(const void* x, const void* cos, const void* sin, void* out, int64_t B, int64_t T,
               int64_t H, int64_t hd, bool cos_broadcast, DType dtype, void* stream);

namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;  // the checks admit only these three
  }
}

void* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "rome_fast: CUDA kernel ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void add_noise_cuda(at::Tensor& x, const at::Tensor& noise, const at::Tensor& rows,
                    const at::Tensor& starts, const at::Tensor& lengths, bool replace) {
  check_add_noise_(x, noise, rows, starts, lengths);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(add_noise(x.data_ptr(), noise.data_ptr<float>(), rows.data_ptr<int64_t>(),
                         starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), noise.size(0),
                         noise.size(1), x.size(1), x.size(2), replace, dtype_of(x), stream_of(x)),
               "add_noise");
}

void restore_rows_cuda(at::Tensor& x, const at::Tensor& clean, const at::Tensor& row_fact,
                       const at::Tensor& row_tok) {
  check_restore_rows_(x, clean, row_fact, row_tok);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(restore_rows(x.data_ptr(), clean.data_ptr(), row_fact.data_ptr<int64_t>(),
                            row_tok.data_ptr<int64_t>(), x.size(0), x.size(1), clean.size(1),
                            x.size(2), dtype_of(x), stream_of(x)),
               "restore_rows");
}

void rank_k_update_cuda(at::Tensor& W, const at::Tensor& U, const at::Tensor& R,
                        std::string_view layout) {
  check_rank_k_update_(W, U, R, layout);
  // W += U Rᵀ (in_out) or W += R Uᵀ (out_in): both are W[r, c] += Σ_k A[r, k] B[c, k].
  const bool in_out = layout == "in_out";
  const at::Tensor& A = in_out ? U : R;
  const at::Tensor& B = in_out ? R : U;
  const c10::cuda::CUDAGuard guard(W.device());
  check_launch(rank_k_update(W.data_ptr(), A.data_ptr<float>(), B.data_ptr<float>(), W.size(0),
                             W.size(1), A.size(1), dtype_of(W), stream_of(W)),
               "rank_k_update");
}

// ATen's triangular solves (cuBLAS) in the factor's dtype; the CPU kernel's own streaming solve
// has no GPU counterpart worth writing, the factor being read twice either way.
at::Tensor cholesky_solve_cuda(const at::Tensor& L, const at::Tensor& B) {
  check_cholesky_solve(L, B);
  const at::Tensor Z = at::linalg_solve_triangular(L, B.to(L.scalar_type()), /*upper=*/false);
  return at::linalg_solve_triangular(L.mT(), Z, /*upper=*/true)
      .to(at::kDouble)
      .contiguous();
}

std::tuple<at::Tensor, at::Tensor> normalize_dot_cuda(const at::Tensor& Y, const at::Tensor& kstar) {
  check_normalize_dot(Y, kstar);
  const int64_t d = Y.size(0), n = Y.size(1);
  at::Tensor U = at::empty({d, n}, kstar.options());
  at::Tensor stats = at::empty({3, n}, kstar.options().dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(Y.device());
  check_launch(normalize_dot(Y.data_ptr(), Y.scalar_type() == at::kDouble, kstar.data_ptr<float>(),
                             U.data_ptr<float>(), stats.data_ptr<double>(), d, n, stream_of(Y)),
               "normalize_dot");
  return {U, stats};
}

at::Tensor rope_heads_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           int64_t heads) {
  check_rope_heads(x, cos, sin, heads);
  const int64_t B = x.size(0), T = x.size(1), hd = x.size(2) / heads;
  at::Tensor out = at::empty({B, heads, T, hd}, x.options());
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(rope_heads(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), B, T, heads,
                          hd, cos.size(0) == 1, dtype_of(x), stream_of(x)),
               "rope_heads");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace rome_fast

TORCH_LIBRARY_IMPL(rome_fast, CUDA, m) {
  m.impl("add_noise_", &rome_fast::cuda::add_noise_cuda);
  m.impl("restore_rows_", &rome_fast::cuda::restore_rows_cuda);
  m.impl("rank_k_update_", &rome_fast::cuda::rank_k_update_cuda);
  m.impl("cholesky_solve", &rome_fast::cuda::cholesky_solve_cuda);
  m.impl("normalize_dot", &rome_fast::cuda::normalize_dot_cuda);
  m.impl("rope_heads", &rome_fast::cuda::rope_heads_cuda);
}
