// Rank-k weight update W += A Bᵀ and the per-column normalise + dot of the fused ROME update, on
// CPU with ATen threads. Inputs are validated in bindings.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_ops.h"

namespace rome_fast::cpu {
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

}  // namespace

void rank_k_update_(torch::Tensor W, const torch::Tensor& A, const torch::Tensor& B) {
  const int64_t rows = W.size(0), cols = W.size(1), n = A.size(1);
  if (rows == 0 || cols == 0 || n == 0) return;
  // Bᵀ [n, cols] is tiny (n·cols floats) and makes the inner loop unit-stride.
  const torch::Tensor Bt = B.t().contiguous();
  const float* a = A.data_ptr<float>();
  const float* bt = Bt.data_ptr<float>();
  const int64_t blocks = (rows + kRB - 1) / kRB;
  // ~64K W elements per task: enough to hide the threading overhead on small layers.
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

void normalize_dot(const torch::Tensor& Y, const torch::Tensor& kstar, torch::Tensor U,
                   torch::Tensor stats) {
  const int64_t d = Y.size(0), n = Y.size(1);
  const float* ks = kstar.data_ptr<float>();
  float* u = U.data_ptr<float>();
  double* st = stats.data_ptr<double>();
  if (Y.scalar_type() == at::kDouble)
    normalize_dot_impl(Y.data_ptr<double>(), ks, u, st, d, n);
  else
    normalize_dot_impl(Y.data_ptr<float>(), ks, u, st, d, n);
}

void cholesky_solve_(const torch::Tensor& L, torch::Tensor Y) {
  const int64_t d = Y.size(0), n = Y.size(1);
  if (d == 0 || n == 0) return;
  // one contiguous right-hand side per row of Yt, so the dot / axpy loops are unit-stride
  torch::Tensor Yt = n == 1 ? Y : Y.t().contiguous();
  double* y = Yt.data_ptr<double>();
  if (L.scalar_type() == at::kDouble)
    cholesky_solve_impl(L.data_ptr<double>(), y, d, n);
  else
    cholesky_solve_impl(L.data_ptr<float>(), y, d, n);
  if (n > 1) Y.copy_(Yt.t());
}

}  // namespace rome_fast::cpu
