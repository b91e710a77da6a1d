// The weight-update ops of a ROME edit: rank_k_update_ (W += A Bᵀ), cholesky_solve (C⁻¹B with the
// cached factor) and normalize_dot (u = y/‖y‖ and ⟨k*, u⟩): schemas, argument checks (shared with
// the CUDA kernels, csrc/cuda/register.cpp) and CPU kernels with ATen threads. rome_update_
// (csrc/rome_update.cpp) composes them. Contracts and numerics: docs/kernels.md.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks.h"

TORCH_LIBRARY_FRAGMENT(rome_fast, m) {
  // W += U Rᵀ ("in_out", W [d_k, d_v]) or W += R Uᵀ ("out_in", W [d_v, d_k]); U [d_k, n] and
  // R [d_v, n] float32. fp32 sums, one rounding per W element, no d_k×d_v temporary.
  m.def("rank_k_update_(Tensor(a!) W, Tensor U, Tensor R, str layout) -> ()");
  // Y = (L Lᵀ)⁻¹ B: L [d, d] lower Cholesky factor (float32/64, row-major), B [d, n] float64.
  m.def("cholesky_solve(Tensor L, Tensor B) -> Tensor");
  // Per column j of Y [d, n] (float32/64): U[:, j] = Y[:, j] / ‖Y[:, j]‖ (float32) and
  // stats [3, n] float64 = (‖Y[:, j]‖, ⟨kstar[:, j], Y[:, j]⟩, ‖kstar[:, j]‖); kstar float32.
  m.def("normalize_dot(Tensor Y, Tensor kstar) -> (Tensor U, Tensor stats)");
}

namespace rome_fast {
namespace {

// Columns per tile: RB accumulator rows of kTile floats stay in L1 next to the B tile.
constexpr int64_t kTile = 256;
// Rows updated together, so each B element loaded from cache feeds RB multiply-adds.
constexpr int64_t kRB = 4;

#define RF_INLINE inline __attribute__((always_inline))

// acc[rr][c] = Σ_k A[r0 + rr, k] · Bt[k, c0 + c]. The first k writes, the rest add: for n = 1 this
// is the single fp32 product the reference's `W += u ⊗ r` rounds. Plain loops, vectorised by the
// compiler for whatever target the caller is compiled for.
RF_INLINE void accumulate(float (*__restrict__ acc)[kTile], const float* __restrict__ A,
                          const float* __restrict__ Bt, int64_t r0, int64_t nr, int64_t c0,
                          int64_t tc, int64_t cols, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float* __restrict__ b = Bt + k * cols + c0;
    if (nr == kRB) {
      const float a0 = A[(r0 + 0) * n + k], a1 = A[(r0 + 1) * n + k];
      const float a2 = A[(r0 + 2) * n + k], a3 = A[(r0 + 3) * n + k];
      float* __restrict__ p0 = acc[0];
      float* __restrict__ p1 = acc[1];
      float* __restrict__ p2 = acc[2];
      float* __restrict__ p3 = acc[3];
      if (k == 0) {
        for (int64_t c = 0; c < tc; ++c) {
          const float bc = b[c];
          p0[c] = a0 * bc, p1[c] = a1 * bc, p2[c] = a2 * bc, p3[c] = a3 * bc;
        }
      } else {
        for (int64_t c = 0; c < tc; ++c) {
          const float bc = b[c];
          p0[c] += a0 * bc, p1[c] += a1 * bc, p2[c] += a2 * bc, p3[c] += a3 * bc;
        }
      }
    } else {
      for (int64_t rr = 0; rr < nr; ++rr) {
        const float a = A[(r0 + rr) * n + k];
        float* __restrict__ p = acc[rr];
        if (k == 0)
          for (int64_t c = 0; c < tc; ++c) p[c] = a * b[c];
        else
          for (int64_t c = 0; c < tc; ++c) p[c] += a * b[c];
      }
    }
  }
}

// The update is summed first and added to W last, rounding once per element.
template <typename scalar_t>
RF_INLINE void add_round_scalar(scalar_t* __restrict__ w, const float* __restrict__ p, int64_t tc) {
  for (int64_t c = 0; c < tc; ++c) w[c] = static_cast<scalar_t>(static_cast<float>(w[c]) + p[c]);
}

template <typename scalar_t>
void update_rows(scalar_t* __restrict__ W, const float* __restrict__ A,
                 const float* __restrict__ Bt, int64_t r0, int64_t nr, int64_t cols, int64_t n) {
  float acc[kRB][kTile];
  for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
    const int64_t tc = std::min(kTile, cols - c0);
    accumulate(acc, A, Bt, r0, nr, c0, tc, cols, n);
    for (int64_t rr = 0; rr < nr; ++rr) add_round_scalar(W + (r0 + rr) * cols + c0, acc[rr], tc);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The extension is built for baseline x86-64 (SSE2), where half/bfloat16 convert one element at a
// time in software. This copy is compiled for AVX2+FMA+F16C and chosen at run time.
#define RF_HAVE_AVX2_PATH 1
#define RF_AVX2 __attribute__((target("avx2,fma,f16c")))

// w[0..8) = round(w[0..8) + v): the one rounding per element, 8 at a time.
RF_AVX2 inline void add8(float* w, __m256 v) { _mm256_storeu_ps(w, _mm256_add_ps(_mm256_loadu_ps(w), v)); }

RF_AVX2 inline void add8(c10::Half* w, __m256 v) {
  auto* q = reinterpret_cast<__m128i*>(w);
  const __m256 f = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(q)), v);
  _mm_storeu_si128(q, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

RF_AVX2 inline void add8(c10::BFloat16* w, __m256 v) {
  auto* q = reinterpret_cast<__m128i*>(w);
  const __m256 x =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16));
  const __m256 f = _mm256_add_ps(x, v);
  // Round to nearest even on the upper 16 bits and keep c10's quiet NaN, as c10::BFloat16 does.
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(q, _mm256_castsi256_si128(packed));
}

// Register-blocked: 4 rows × 16 columns of fp32 sums live in 8 ymm registers across all k, so W is
// touched exactly once (load, add, round, store) and B/A come from L1.
template <typename scalar_t>
RF_AVX2 void update_rows_avx2(scalar_t* __restrict__ W, const float* __restrict__ A,
                              const float* __restrict__ Bt, int64_t r0, int64_t nr, int64_t cols,
                              int64_t n) {
  int64_t c = 0;
  if (nr == kRB) {
    const float* a0 = A + r0 * n;
    for (; c + 16 <= cols; c += 16) {
      __m256 acc[kRB][2];
      for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < n; ++k) {
        const __m256 b0 = _mm256_loadu_ps(Bt + k * cols + c);
        const __m256 b1 = _mm256_loadu_ps(Bt + k * cols + c + 8);
        for (int rr = 0; rr < kRB; ++rr) {
          const __m256 a = _mm256_broadcast_ss(a0 + rr * n + k);
          acc[rr][0] = _mm256_fmadd_ps(a, b0, acc[rr][0]);  // fma(a, b, 0) = the rounded product
          acc[rr][1] = _mm256_fmadd_ps(a, b1, acc[rr][1]);
        }
      }
      for (int rr = 0; rr < kRB; ++rr) {
        scalar_t* w = W + (r0 + rr) * cols + c;
        add8(w, acc[rr][0]);
        add8(w + 8, acc[rr][1]);
      }
    }
  }
  // column tail (< 16) and the last rows (< 4): the tiled path
  float acc[kRB][kTile];
  for (int64_t c0 = c; c0 < cols; c0 += kTile) {
    const int64_t tc = std::min(kTile, cols - c0);
    accumulate(acc, A, Bt, r0, nr, c0, tc, cols, n);
    for (int64_t rr = 0; rr < nr; ++rr) add_round_scalar(W + (r0 + rr) * cols + c0, acc[rr], tc);
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename Y_t>
void normalize_dot_impl(const Y_t* Y, const float* ks, float* U, double* stats, int64_t d,
                        int64_t n) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      double yy = 0, ky = 0, kk = 0;
      for (int64_t i = 0; i < d; ++i) {
        const double y = static_cast<double>(Y[i * n + j]), k = ks[i * n + j];
        yy += y * y;
        ky += k * y;
        kk += k * k;
      }
      const double norm = std::sqrt(yy);
      // A zero or non-finite norm is reported through stats and rejected by the caller.
      const double inv = norm > 0 ? 1.0 / norm : 0.0;
      for (int64_t i = 0; i < d; ++i) U[i * n + j] = static_cast<float>(Y[i * n + j] * inv);
      stats[j] = norm;
      stats[n + j] = ky;
      stats[2 * n + j] = std::sqrt(kk);
    }
  });
}

// Work per task of the update's parallel region, in W elements: below this a region's wake-up costs
// more than it saves (and on a shared machine a woken thread may wait a whole scheduler tick).
constexpr int64_t kTaskWork = 1 << 18;

// The two memory-bound inner loops of the solves, vectorised (fp64 sums; `omp simd` allows the
// reassociation of the dot product without -ffast-math). A copy for AVX2 is chosen at run time.
template <typename F>
RF_INLINE double dot_body(const F* __restrict__ row, const double* __restrict__ y, int64_t m) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += static_cast<double>(row[j]) * y[j];
  return s;
}
template <typename F>
RF_INLINE void axpy_body(const F* __restrict__ seg, double a, double* __restrict__ p, int64_t m) {
#pragma omp simd
  for (int64_t c = 0; c < m; ++c) p[c] += static_cast<double>(seg[c]) * a;
}
template <typename F>
double dot_row(const F* row, const double* y, int64_t m) { return dot_body(row, y, m); }
template <typename F>
void axpy_row(const F* seg, double a, double* p, int64_t m) { axpy_body(seg, a, p, m); }
#ifdef RF_HAVE_AVX2_PATH
template <typename F>
RF_AVX2 double dot_row_avx2(const F* row, const double* y, int64_t m) { return dot_body(row, y, m); }
template <typename F>
RF_AVX2 void axpy_row_avx2(const F* seg, double a, double* p, int64_t m) { axpy_body(seg, a, p, m); }
#endif

template <typename F>
struct RowOps {
  double (*dot)(const F*, const double*, int64_t) = dot_row<F>;
  void (*axpy)(const F*, double, double*, int64_t) = axpy_row<F>;
  RowOps() {
#ifdef RF_HAVE_AVX2_PATH
    if (cpu_has_avx2()) dot = dot_row_avx2<F>, axpy = axpy_row_avx2<F>;
#endif
  }
};

// Triangular solves with the row-major lower factor, one right-hand side y (contiguous) at a time:
// forward L z = b takes one dot product per row, backward Lᵀ x = z one axpy per row (row i of L is
// column i of Lᵀ), so both passes stream the rows of L front to back / back to front, reading the
// triangle once each, like a matvec and without copying L (at::cholesky_solve copies it to
// column-major on every call). Sequential on purpose: a solve is a chain of d dependent steps, and
// the memory-bound pass gains little from the per-row synchronisation threads would need.
template <typename F>
void cholesky_solve_impl(const F* L, double* yt, int64_t d, int64_t n) {
  const RowOps<F> ops;
  // Right-hand sides inner: a row of L comes from memory once and from cache for the other n-1.
  for (int64_t i = 0; i < d; ++i) {
    const F* row = L + i * d;
    const double diag = row[i];
    for (int64_t k = 0; k < n; ++k) {
      double* y = yt + k * d;
      y[i] = (y[i] - ops.dot(row, y, i)) / diag;
    }
  }
  for (int64_t i = d - 1; i >= 0; --i) {
    const F* row = L + i * d;
    const double diag = row[i];
    for (int64_t k = 0; k < n; ++k) {
      double* y = yt + k * d;
      y[i] /= diag;
      ops.axpy(row, -y[i], y, i);
    }
  }
}

// W[r, c] += Σ_k A[r, k] B[c, k]: W [rows, cols], A [rows, n], B [cols, n] fp32, all contiguous.
void rank_k_kernel(at::Tensor& W, const at::Tensor& A, const at::Tensor& B) {
  const int64_t rows = W.size(0), cols = W.size(1), n = A.size(1);
  if (rows == 0 || cols == 0 || n == 0) return;
  // Bᵀ [n, cols] is tiny (n·cols floats) and makes the inner loop unit-stride.
  const at::Tensor Bt = B.t().contiguous();
  const float* a = A.data_ptr<float>();
  const float* bt = Bt.data_ptr<float>();
  const int64_t blocks = (rows + kRB - 1) / kRB;
  const int64_t grain = std::max<int64_t>(1, kTaskWork / (kRB * cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "rank_k_update_", [&] {
    scalar_t* w = W.data_ptr<scalar_t>();
    bool avx2 = false;
#ifdef RF_HAVE_AVX2_PATH
    avx2 = !std::is_same_v<scalar_t, double> && cpu_has_avx2();
#endif
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t r0 = blk * kRB, nr = std::min(kRB, rows - r0);
#ifdef RF_HAVE_AVX2_PATH
        if constexpr (!std::is_same_v<scalar_t, double>) {
          if (avx2) {
            update_rows_avx2(w, a, bt, r0, nr, cols, n);
            continue;
          }
        }
#endif
        update_rows(w, a, bt, r0, nr, cols, n);
      }
    });
  });
}

void check_factor_matrix(const at::Tensor& x, const char* name, int64_t rows, int64_t n,
                         const char* rows_name, const at::Tensor& W, std::string_view layout) {
  RF_CHECK(x.dim() == 2, name, " must be 2-D [", rows_name, ", n], got shape ", x.sizes());
  RF_CHECK(x.size(0) == rows, name, " has ", x.size(0), " rows but W ", W.sizes(), " in layout '",
           layout, "' has ", rows_name, " = ", rows);
  RF_CHECK(x.size(1) == n, name, " has ", x.size(1), " columns, expected n = ", n);
  RF_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  RF_CHECK(x.is_contiguous(), name, " must be contiguous");
  check_same_device(x, name, W, "W");
}

}  // namespace

void check_rank_k_update_(const at::Tensor& W, const at::Tensor& U, const at::Tensor& R,
                          std::string_view layout) {
  check_weight(W);
  const bool in_out = parse_layout(layout);
  const int64_t d_k = in_out ? W.size(0) : W.size(1), d_v = in_out ? W.size(1) : W.size(0);
  RF_CHECK(U.dim() == 2, "U must be 2-D [d_k, n], got shape ", U.sizes());
  const int64_t n = U.size(1);
  check_factor_matrix(U, "U", d_k, n, "d_k", W, layout);
  check_factor_matrix(R, "R", d_v, n, "d_v", W, layout);
}

void check_cholesky_solve(const at::Tensor& L, const at::Tensor& B) {
  RF_CHECK(L.dim() == 2 && L.size(0) == L.size(1), "L must be a square matrix, got shape ",
           L.sizes());
  RF_CHECK(L.scalar_type() == at::kFloat || L.scalar_type() == at::kDouble,
           "L must be float32 or float64, got ", L.scalar_type());
  RF_CHECK(B.dim() == 2 && B.size(0) == L.size(0), "B must be [", L.size(0), ", n], got shape ",
           B.sizes());
  RF_CHECK(B.scalar_type() == at::kDouble, "B must be float64, got ", B.scalar_type());
  check_same_device(B, "B", L, "L");
}

void check_normalize_dot(const at::Tensor& Y, const at::Tensor& kstar) {
  RF_CHECK(Y.dim() == 2, "Y must be 2-D [d, n], got shape ", Y.sizes());
  RF_CHECK(Y.scalar_type() == at::kFloat || Y.scalar_type() == at::kDouble,
           "Y must be float32 or float64, got ", Y.scalar_type());
  RF_CHECK(Y.is_contiguous() && kstar.is_contiguous(), "Y and kstar must be contiguous");
  RF_CHECK(kstar.sizes() == Y.sizes(), "kstar shape ", kstar.sizes(), " != Y shape ", Y.sizes());
  RF_CHECK(kstar.scalar_type() == at::kFloat, "kstar must be float32, got ", kstar.scalar_type());
  check_same_device(kstar, "kstar", Y, "Y");
}

namespace {

// W += U Rᵀ (in_out) or W += R Uᵀ (out_in): both are W[r, c] += Σ_k A[r, k] B[c, k].
void rank_k_update_cpu(at::Tensor& W, const at::Tensor& U, const at::Tensor& R,
                       std::string_view layout) {
  check_rank_k_update_(W, U, R, layout);
  const bool in_out = parse_layout(layout);
  rank_k_kernel(W, in_out ? U : R, in_out ? R : U);
}

// Own blocked solves: fp64 sums, the factor read in place (at::cholesky_solve copies the whole
// d×d factor to column-major on every call: ~10× the cost of the two solves).
at::Tensor cholesky_solve_cpu(const at::Tensor& L, const at::Tensor& B) {
  check_cholesky_solve(L, B);
  const at::Tensor Lc = L.contiguous();  // a copy only if not row-major
  const int64_t d = B.size(0), n = B.size(1);
  if (d == 0 || n == 0) return B.clone(at::MemoryFormat::Contiguous);
  // one contiguous right-hand side per row of Yt (a copy: B is not written), so the dot / axpy
  // loops are unit-stride
  at::Tensor Yt = B.t().clone(at::MemoryFormat::Contiguous);
  double* y = Yt.data_ptr<double>();
  if (Lc.scalar_type() == at::kDouble)
    cholesky_solve_impl(Lc.data_ptr<double>(), y, d, n);
  else
    cholesky_solve_impl(Lc.data_ptr<float>(), y, d, n);
  return Yt.t().contiguous();
}

std::tuple<at::Tensor, at::Tensor> normalize_dot_cpu(const at::Tensor& Y, const at::Tensor& kstar) {
  check_normalize_dot(Y, kstar);
  const int64_t d = Y.size(0), n = Y.size(1);
  at::Tensor U = at::empty({d, n}, kstar.options());
  at::Tensor stats = at::empty({3, n}, kstar.options().dtype(at::kDouble));
  const float* ks = kstar.data_ptr<float>();
  float* u = U.data_ptr<float>();
  double* st = stats.data_ptr<double>();
  if (Y.scalar_type() == at::kDouble)
    normalize_dot_impl(Y.data_ptr<double>(), ks, u, st, d, n);
  else
    normalize_dot_impl(Y.data_ptr<float>(), ks, u, st, d, n);
  return {U, stats};
}

}  // namespace
}  // namespace rome_fast

TORCH_LIBRARY_IMPL(rome_fast, CPU, m) {
  m.impl("rank_k_update_", &rome_fast::rank_k_update_cpu);
  m.impl("cholesky_solve", &rome_fast::cholesky_solve_cpu);
  m.impl("normalize_dot", &rome_fast::normalize_dot_cpu);
}
