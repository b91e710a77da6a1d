// Row-wise noise and restore operations for causal tracing, parallel over rows with ATen threads.
#include "cpu_ops.h"

#include <ATen/Parallel.h>

namespace rome_fast::cpu {

void add_noise_(torch::Tensor x, const torch::Tensor& noise, const torch::Tensor& rows,
                const torch::Tensor& starts, const torch::Tensor& lengths, bool replace) {
  const int64_t N = noise.size(0), L = noise.size(1), D = noise.size(2);
  const int64_t T = x.size(1);
  const auto* row = rows.data_ptr<int64_t>();
  const auto* start = starts.data_ptr<int64_t>();
  const auto* len = lengths.data_ptr<int64_t>();
  const float* nz = noise.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_noise_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, N * L, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i / L, l = i % L;
        if (l >= len[n]) continue;
        scalar_t* dst = xp + (row[n] * T + start[n] + l) * D;
        const float* src = nz + i * D;
        if (replace) {
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d]);
        } else {
          // Add in fp32, round once: matches torch's `x += noise.to(x.dtype)` only up to one
          // rounding in half types, exactly in fp32.
          for (int64_t d = 0; d < D; ++d)
            dst[d] = static_cast<scalar_t>(static_cast<float>(dst[d]) + src[d]);
        }
      }
    });
  });
}

void restore_rows_(torch::Tensor x, const torch::Tensor& clean, const torch::Tensor& row_fact,
                   const torch::Tensor& row_tok) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t Tc = clean.size(1);
  const auto* fact = row_fact.data_ptr<int64_t>();
  const auto* tok = row_tok.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "restore_rows_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = clean.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        if (tok[b] < 0) continue;
        std::memcpy(xp + (b * T + tok[b]) * D, cp + (fact[b] * Tc + tok[b]) * D,
                    D * sizeof(scalar_t));
      }
    });
  });
}

}  // namespace rome_fast::cpu
