// Rank-k weight update W += A Bᵀ and the per-column normalise + dot of the fused ROME update, on
// CPU with ATen threads. Inputs are validated in bindings.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <mutex>
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

// Blocked triangular solves with the row-major lower factor. Each block of kNB rows does one
// parallel panel product (rows of L read contiguously, once) and a short sequential triangular
// solve, so a d = 6400 solve is ~13 parallel regions per pass: the two passes together read L
// once per direction, like a matvec, where LAPACK's potrs via at::cholesky_solve first copies L.
constexpr int64_t kNB = 512;

// dot(row[0..m), y[0..m)) with y of stride 1, four independent fp64 chains.
template <typename F>
inline double dot1(const F* __restrict__ row, const double* __restrict__ y, int64_t m) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    s0 += static_cast<double>(row[j]) * y[j];
    s1 += static_cast<double>(row[j + 1]) * y[j + 1];
    s2 += static_cast<double>(row[j + 2]) * y[j + 2];
    s3 += static_cast<double>(row[j + 3]) * y[j + 3];
  }
  for (; j < m; ++j) s0 += static_cast<double>(row[j]) * y[j];
  return (s0 + s1) + (s2 + s3);
}

// Forward: L Z = B.
template <typename F>
void forward_solve(const F* L, double* y, int64_t d, int64_t n) {
  for (int64_t i0 = 0; i0 < d; i0 += kNB) {
    const int64_t i1 = std::min(d, i0 + kNB);
    if (i0 > 0) {  // y[I] -= L[I, :i0] y[:i0]
      at::parallel_for(i0, i1, 16, [&](int64_t lo, int64_t hi) {
        std::vector<double> acc(n);
        for (int64_t i = lo; i < hi; ++i) {
          const F* row = L + i * d;
          if (n == 1) {
            y[i] -= dot1(row, y, i0);
            continue;
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < i0; ++j) {
            const double l = row[j];
            for (int64_t k = 0; k < n; ++k) acc[k] += l * y[j * n + k];
          }
          for (int64_t k = 0; k < n; ++k) y[i * n + k] -= acc[k];
        }
      });
    }
    for (int64_t i = i0; i < i1; ++i) {  // the diagonal block, in order
      const F* row = L + i * d;
      for (int64_t j = i0; j < i; ++j) {
        const double l = row[j];
        for (int64_t k = 0; k < n; ++k) y[i * n + k] -= l * y[j * n + k];
      }
      const double inv = 1.0 / static_cast<double>(row[i]);
      for (int64_t k = 0; k < n; ++k) y[i * n + k] *= inv;
    }
  }
}

// Backward: Lᵀ X = Z, last block first. Lᵀ's rows are L's columns, so the panel
// x[I] -= L[i1:, I]ᵀ x[i1:] walks rows of L (contiguous segments of the block's columns) and
// each task sums into its own buffer.
template <typename F>
void backward_solve(const F* L, double* x, int64_t d, int64_t n) {
  const int64_t last = ((d - 1) / kNB) * kNB;
  std::mutex mu;
  for (int64_t i0 = last; i0 >= 0; i0 -= kNB) {
    const int64_t i1 = std::min(d, i0 + kNB), nb = i1 - i0;
    if (i1 < d) {
      at::parallel_for(i1, d, 64, [&](int64_t lo, int64_t hi) {
        std::vector<double> part(nb * n, 0.0);
        for (int64_t r = lo; r < hi; ++r) {
          const F* __restrict__ seg = L + r * d + i0;
          for (int64_t k = 0; k < n; ++k) {
            const double xr = x[r * n + k];
            if (n == 1) {
              double* __restrict__ p = part.data();
              for (int64_t c = 0; c < nb; ++c) p[c] += static_cast<double>(seg[c]) * xr;
            } else {
              for (int64_t c = 0; c < nb; ++c) part[c * n + k] += static_cast<double>(seg[c]) * xr;
            }
          }
        }
        const std::lock_guard<std::mutex> lock(mu);
        for (int64_t c = 0; c < nb * n; ++c) x[i0 * n + c] -= part[c];
      });
    }
    for (int64_t i = i1 - 1; i >= i0; --i) {  // the diagonal block, in reverse
      const F* row = L + i * d;
      const double inv = 1.0 / static_cast<double>(row[i]);
      for (int64_t k = 0; k < n; ++k) x[i * n + k] *= inv;
      for (int64_t j = i0; j < i; ++j) {
        const double l = row[j];
        for (int64_t k = 0; k < n; ++k) x[j * n + k] -= l * x[i * n + k];
      }
    }
  }
}

template <typename F>
void cholesky_solve_impl(const F* L, double* y, int64_t d, int64_t n) {
  forward_solve(L, y, d, n);
  backward_solve(L, y, d, n);
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
  const int64_t grain = std::max<int64_t>(1, 65536 / (kRB * cols));
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
  double* y = Y.data_ptr<double>();
  if (L.scalar_type() == at::kDouble)
    cholesky_solve_impl(L.data_ptr<double>(), y, d, n);
  else
    cholesky_solve_impl(L.data_ptr<float>(), y, d, n);
}

}  // namespace rome_fast::cpu
