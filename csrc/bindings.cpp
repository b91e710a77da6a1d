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

// ---- Solve + rank-k weight update (rank_one.cpp, rank_one_kernels.cu) ----

// "in_out": W is [d_k, d_v] (GPT-2 Conv1D), "out_in": W is [d_v, d_k] (nn.Linear).
bool parse_layout_in_out(const std::string& layout) {
  RF_CHECK(layout == "in_out" || layout == "out_in",
           "layout must be 'in_out' (W is [d_k, d_v], GPT-2 Conv1D) or 'out_in' (W is [d_v, d_k], "
           "nn.Linear), got '", layout, "'");
  return layout == "in_out";
}

void check_weight(const torch::Tensor& W) {
  RF_CHECK(W.dim() == 2, "W must be 2-D, got shape ", W.sizes());
  RF_CHECK(W.is_contiguous(), "W must be contiguous (it is updated in place)");
  const auto st = W.scalar_type();
  RF_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
           "W must be float32, float16 or bfloat16, got ", st);
}

void check_factor_matrix(const torch::Tensor& x, const char* name, int64_t rows, int64_t n,
                         const char* rows_name, const torch::Tensor& W, const std::string& layout) {
  RF_CHECK(x.dim() == 2, name, " must be 2-D [", rows_name, ", n], got shape ", x.sizes());
  RF_CHECK(x.size(0) == rows, name, " has ", x.size(0), " rows but W ", W.sizes(), " in layout '",
           layout, "' has ", rows_name, " = ", rows);
  RF_CHECK(x.size(1) == n, name, " has ", x.size(1), " columns, expected n = ", n);
  RF_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  RF_CHECK(x.is_contiguous(), name, " must be contiguous");
  RF_CHECK(x.device() == W.device(), name, " is on ", x.device(), " but W is on ", W.device());
}

// W += U Rᵀ (in_out) or W += R Uᵀ (out_in): both are W[r, c] += Σ_k A[r, k] B[c, k].
void rank_k_update_unchecked(torch::Tensor W, const torch::Tensor& U, const torch::Tensor& R,
                             bool in_out) {
  const torch::Tensor& A = in_out ? U : R;
  const torch::Tensor& B = in_out ? R : U;
  if (W.is_cpu()) return rome_fast::cpu::rank_k_update_(W, A, B);
#ifdef ROME_FAST_WITH_CUDA
  const c10::cuda::CUDAGuard guard(W.device());
  check_launch(rome_fast::cuda::rank_k_update(W.data_ptr(), A.data_ptr<float>(), B.data_ptr<float>(),
                                              W.size(0), W.size(1), A.size(1),
                                              cuda_dtype(W.scalar_type()),
                                              at::cuda::getCurrentCUDAStream().stream()),
               "rank_k_update");
#else
  TORCH_CHECK(false, "rome_fast: W is on ", W.device(), " but the extension was built without CUDA");
#endif
}

void rank_k_update_(torch::Tensor W, torch::Tensor U, torch::Tensor R, const std::string& layout) {
  check_weight(W);
  const bool in_out = parse_layout_in_out(layout);
  const int64_t d_k = in_out ? W.size(0) : W.size(1), d_v = in_out ? W.size(1) : W.size(0);
  RF_CHECK(U.dim() == 2, "U must be 2-D [d_k, n], got shape ", U.sizes());
  const int64_t n = U.size(1);
  check_factor_matrix(U, "U", d_k, n, "d_k", W, layout);
  check_factor_matrix(R, "R", d_v, n, "d_v", W, layout);
  rank_k_update_unchecked(W, U, R, in_out);
}

// Columns whose ⟨k*, u⟩ is below this fraction of ‖k*‖ would scale the residual by > 10⁶.
constexpr double kMinCosine = 1e-6;

std::tuple<torch::Tensor, torch::Tensor> rome_update_(torch::Tensor W, torch::Tensor factor,
                                                      torch::Tensor kbar, torch::Tensor kstar,
                                                      torch::Tensor resid, const std::string& layout,
                                                      const std::string& factor_kind,
                                                      c10::optional<torch::Tensor> pivots) {
  check_weight(W);
  const bool in_out = parse_layout_in_out(layout);
  const int64_t d_k = in_out ? W.size(0) : W.size(1), d_v = in_out ? W.size(1) : W.size(0);
  RF_CHECK(factor_kind == "cholesky" || factor_kind == "lu",
           "factor_kind must be 'cholesky' or 'lu', got '", factor_kind, "'");
  RF_CHECK(factor.dim() == 2 && factor.size(0) == factor.size(1),
           "factor must be a square matrix, got shape ", factor.sizes());
  RF_CHECK(factor.size(0) == d_k, "factor is ", factor.sizes(), " but W ", W.sizes(), " in layout '",
           layout, "' has d_k = ", d_k, " (is the layout right?)");
  RF_CHECK(factor.scalar_type() == at::kFloat || factor.scalar_type() == at::kDouble,
           "factor must be float32 or float64, got ", factor.scalar_type());
  RF_CHECK(factor.device() == W.device(), "factor is on ", factor.device(), " but W is on ",
           W.device());
  if (factor_kind == "lu") {
    RF_CHECK(pivots.has_value(), "factor_kind 'lu' needs the pivots of the LU factorisation");
    RF_CHECK(pivots->dim() == 1 && pivots->size(0) == d_k && pivots->scalar_type() == at::kInt,
             "pivots must be int32 of shape [", d_k, "], got ", pivots->scalar_type(), " ",
             pivots->sizes());
    RF_CHECK(pivots->device() == W.device(), "pivots are on ", pivots->device(), " but W is on ",
             W.device());
  }
  const bool vec = kbar.dim() == 1;
  RF_CHECK(kbar.dim() == 1 || kbar.dim() == 2, "kbar must be [d_k] or [d_k, n], got shape ",
           kbar.sizes());
  RF_CHECK(kstar.sizes() == kbar.sizes(), "kstar shape ", kstar.sizes(), " != kbar shape ",
           kbar.sizes());
  RF_CHECK(kbar.size(0) == d_k, "kbar has ", kbar.size(0), " entries but W ", W.sizes(),
           " in layout '", layout, "' has d_k = ", d_k, " (is the layout right?)");
  const int64_t n = vec ? 1 : kbar.size(1);
  RF_CHECK(resid.dim() == kbar.dim() && resid.size(0) == d_v && (vec || resid.size(1) == n),
           "resid must be ", vec ? "[d_v]" : "[d_v, n]", " with d_v = ", d_v, " (W ", W.sizes(),
           " in layout '", layout, "') and n = ", n, ", got shape ", resid.sizes());
  for (const auto* t : {&kbar, &kstar, &resid}) {
    RF_CHECK(at::isFloatingType(t->scalar_type()), "kbar, kstar and resid must be floating point, got ",
             t->scalar_type());
    RF_CHECK(t->device() == W.device(), "kbar, kstar and resid must be on W's device ", W.device(),
             ", got ", t->device());
  }
  RF_CHECK(n > 0, "no edits: kbar has 0 columns");
  // One host sync for all three; finding the culprit only on failure.
  if (!(at::isfinite(kbar).all() & at::isfinite(kstar).all() & at::isfinite(resid).all())
           .item<bool>()) {
    const char* bad = !at::isfinite(kbar).all().item<bool>()    ? "kbar"
                      : !at::isfinite(kstar).all().item<bool>() ? "kstar"
                                                                : "resid";
    RF_CHECK(false, bad, " contains NaN or Inf");
  }

  const torch::Tensor kb = (vec ? kbar.unsqueeze(1) : kbar).to(factor.scalar_type()).contiguous();
  const torch::Tensor ks = (vec ? kstar.unsqueeze(1) : kstar).to(at::kFloat).contiguous();
  const torch::Tensor rs = (vec ? resid.unsqueeze(1) : resid).to(at::kDouble);
  // u ∝ C⁻¹ k̄ from the cached factor: L then Lᵀ triangular solves (not at::cholesky_solve, which
  // copies the whole d×d factor to column-major on every call: ~10× the cost of the two solves),
  // or the LU solve. ATen's results may come back column-major: Y is made row-major for the kernels.
  torch::Tensor Y;
  if (factor_kind == "cholesky" && W.is_cpu()) {
    // own blocked solves: fp64 sums, no copy, few parallel regions (see rank_one.cpp)
    Y = kb.to(at::kDouble).contiguous().clone();
    rome_fast::cpu::cholesky_solve_(factor.contiguous(), Y);  // a copy only if not row-major
  } else if (factor_kind == "cholesky") {
    Y = at::linalg_solve_triangular(factor, kb, /*upper=*/false);
    Y = at::linalg_solve_triangular(factor.mT(), Y, /*upper=*/true);
  } else {
    Y = at::linalg_lu_solve(factor, *pivots, kb);
  }
  Y = Y.contiguous();
  torch::Tensor U = at::empty({d_k, n}, ks.options());
  torch::Tensor stats = at::empty({3, n}, ks.options().dtype(at::kDouble));
  if (W.is_cpu()) {
    rome_fast::cpu::normalize_dot(Y, ks, U, stats);
  } else {
#ifdef ROME_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(W.device());
    check_launch(rome_fast::cuda::normalize_dot(Y.data_ptr(), Y.scalar_type() == at::kDouble,
                                                ks.data_ptr<float>(), U.data_ptr<float>(),
                                                stats.data_ptr<double>(), d_k, n,
                                                at::cuda::getCurrentCUDAStream().stream()),
                 "normalize_dot");
#else
    TORCH_CHECK(false, "rome_fast: W is on ", W.device(), " but the extension was built without CUDA");
#endif
  }
  const torch::Tensor st = stats.cpu();
  const double* s = st.data_ptr<double>();
  for (int64_t j = 0; j < n; ++j) {
    const double norm = s[j], dot = s[n + j], knorm = s[2 * n + j];
    RF_CHECK(std::isfinite(norm) && norm > 0, "C^-1 kbar is ",
             std::isfinite(norm) ? "zero" : "not finite", " for edit ", j,
             std::isfinite(norm) ? " (is kbar zero?)" : " (is C singular or the factor invalid?)");
    const double cosine = dot / (norm * knorm);
    RF_CHECK(std::isfinite(cosine) && std::abs(cosine) > kMinCosine,
             "the denominator <kstar, u> is ~0 for edit ", j, " (<kstar, u> = ", dot / norm,
             ", cosine ", cosine, "): kstar is orthogonal to C^-1 kbar, the update would blow up");
  }
  // right = resid / <k*, u>, divided in fp64 and rounded once.
  const torch::Tensor R = (rs / (stats[1] / stats[0])).to(at::kFloat).contiguous();
  rank_k_update_unchecked(W, U, R, in_out);
  if (vec) return {U.squeeze(1), R.squeeze(1)};
  return {U, R};
}

// ---- Fused block pieces (block_ops.cpp, block_kernels.cu) ----

torch::Tensor rope_heads(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  check_float_states(x, "x", 3);
  RF_CHECK(heads > 0 && x.size(2) % heads == 0, "x width ", x.size(2), " is not a multiple of ",
           heads, " heads");
  const int64_t B = x.size(0), T = x.size(1), hd = x.size(2) / heads;
  RF_CHECK(hd % 2 == 0, "the head size ", hd, " must be even for rotary embeddings");
  for (const auto* t : {&cos, &sin}) {
    check_float_states(*t, "cos/sin", 3);
    RF_CHECK(t->scalar_type() == x.scalar_type(), "cos/sin dtype ", t->scalar_type(), " != x dtype ",
             x.scalar_type());
    RF_CHECK(t->device() == x.device(), "cos/sin are on ", t->device(), ", x on ", x.device());
    RF_CHECK((t->size(0) == B || t->size(0) == 1) && t->size(1) == T && t->size(2) == hd,
             "cos/sin must be [", B, " or 1, ", T, ", ", hd, "], got ", t->sizes());
  }
  RF_CHECK(cos.sizes() == sin.sizes(), "cos ", cos.sizes(), " and sin ", sin.sizes(), " differ");
  torch::Tensor out = at::empty({B, heads, T, hd}, x.options());
  if (x.is_cpu()) {
    rome_fast::cpu::rope_heads(x, cos, sin, out);
    return out;
  }
#ifdef ROME_FAST_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(rome_fast::cuda::rope_heads(x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                           out.data_ptr(), B, T, heads, hd, cos.size(0) == 1,
                                           cuda_dtype(x.scalar_type()),
                                           at::cuda::getCurrentCUDAStream().stream()),
               "rope_heads");
  return out;
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
  m.def("rank_k_update_", &rank_k_update_,
        "W += U R^T ('in_out', W [d_k, d_v]) or W += R U^T ('out_in', W [d_v, d_k]) in place; U "
        "[d_k, n], R [d_v, n] float32; fp32 sums, one rounding per W element",
        py::arg("W"), py::arg("U"), py::arg("R"), py::arg("layout"));
  m.def("rome_update_", &rome_update_,
        "Fused ROME update: u = C^-1 kbar / ||C^-1 kbar|| from the cached factor of C, right = "
        "resid / <kstar, u>, W += u (x) right in place; batched over columns. Returns (u, right)",
        py::arg("W"), py::arg("factor"), py::arg("kbar"), py::arg("kstar"), py::arg("resid"),
        py::arg("layout"), py::arg("factor_kind") = "cholesky", py::arg("pivots") = py::none());
  m.def("rope_heads", &rope_heads,
        "Rotary embedding written head-major: out [B, H, T, hd] = x*cos + rotate_half(x)*sin for "
        "each head of x [B, T, H*hd]; cos/sin [B or 1, T, hd]",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("heads"));
}
