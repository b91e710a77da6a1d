// Rank-k weight update W += A Bᵀ and the per-column normalise + dot of the fused ROME update, on
// CPU with ATen threads. Inputs are validated in bindings.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu_ops.h"

namespace rome_fast::cpu {
namespace {

// Columns per tile: RB accumulator rows of kTile floats stay in L1 next to the B tile.
constexpr int64_t kTile = 256;
// Rows updated together, so each B element loaded from cache feeds RB multiply-adds.
constexpr int64_t kRB = 4;

template <typename scalar_t>
void update_rows(scalar_t* __restrict__ W, const float* __restrict__ A,
                 const float* __restrict__ Bt, int64_t r0, int64_t nr, int64_t cols, int64_t n) {
  float acc[kRB][kTile];
  for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
    const int64_t tc = std::min(kTile, cols - c0);
    for (int64_t rr = 0; rr < nr; ++rr) std::fill(acc[rr], acc[rr] + tc, 0.0f);
    // Sum the n products first and add W last: for n = 1 this rounds exactly like the
    // reference's `W += u ⊗ r` (one fp32 product, one add, one cast).
    for (int64_t k = 0; k < n; ++k) {
      const float* __restrict__ b = Bt + k * cols + c0;
      if (nr == kRB) {
        const float a0 = A[(r0 + 0) * n + k], a1 = A[(r0 + 1) * n + k];
        const float a2 = A[(r0 + 2) * n + k], a3 = A[(r0 + 3) * n + k];
        float* __restrict__ p0 = acc[0];
        float* __restrict__ p1 = acc[1];
        float* __restrict__ p2 = acc[2];
        float* __restrict__ p3 = acc[3];
        for (int64_t c = 0; c < tc; ++c) {
          const float bc = b[c];
          p0[c] += a0 * bc;
          p1[c] += a1 * bc;
          p2[c] += a2 * bc;
          p3[c] += a3 * bc;
        }
      } else {
        for (int64_t rr = 0; rr < nr; ++rr) {
          const float a = A[(r0 + rr) * n + k];
          float* __restrict__ p = acc[rr];
          for (int64_t c = 0; c < tc; ++c) p[c] += a * b[c];
        }
      }
    }
    for (int64_t rr = 0; rr < nr; ++rr) {
      scalar_t* __restrict__ w = W + (r0 + rr) * cols + c0;
      const float* __restrict__ p = acc[rr];
      for (int64_t c = 0; c < tc; ++c)
        w[c] = static_cast<scalar_t>(static_cast<float>(w[c]) + p[c]);
    }
  }
}

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
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t r0 = blk * kRB;
        update_rows(w, a, bt, r0, std::min(kRB, rows - r0), cols, n);
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

}  // namespace rome_fast::cpu
