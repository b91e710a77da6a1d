// add_noise_ and restore_rows_, the row-wise operations of causal tracing: schemas, argument checks
// (shared with the CUDA kernels, csrc/cuda/register.cpp) and CPU kernels, parallel over rows with
// ATen threads. Contracts and numerics: docs/kernels.md.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../checks.h"

TORCH_LIBRARY_FRAGMENT(rome_fast, m) {
  // x[rows[n], starts[n] + l, :] (+)= noise[n, l, :] for l < lengths[n]
  m.def("add_noise_(Tensor(a!) x, Tensor noise, Tensor rows, Tensor starts, Tensor lengths, "
        "bool replace=False) -> ()");
  // x[b, row_tok[b], :] = clean[row_fact[b], row_tok[b], :] wherever row_tok[b] >= 0
  m.def("restore_rows_(Tensor(a!) x, Tensor clean, Tensor row_fact, Tensor row_tok) -> ()");
}

namespace rome_fast {

void check_add_noise_(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& rows,
                      const at::Tensor& starts, const at::Tensor& lengths) {
  check_float_states(x, "x", 3);
  RF_CHECK(noise.dim() == 3 && noise.scalar_type() == at::kFloat && noise.is_contiguous(),
           "noise must be a contiguous float32 tensor [N, L, D], got ", noise.scalar_type(), " ",
           noise.sizes());
  RF_CHECK(noise.size(2) == x.size(2), "noise width ", noise.size(2), " != hidden size ", x.size(2));
  check_same_device(noise, "noise", x, "x");
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
}

void check_restore_rows_(const at::Tensor& x, const at::Tensor& clean, const at::Tensor& row_fact,
                         const at::Tensor& row_tok) {
  check_float_states(x, "x", 3);
  check_float_states(clean, "clean", 3);
  RF_CHECK(clean.scalar_type() == x.scalar_type(), "clean dtype ", clean.scalar_type(),
           " != states dtype ", x.scalar_type());
  check_same_device(clean, "clean", x, "x");
  RF_CHECK(clean.size(2) == x.size(2), "clean width ", clean.size(2), " != hidden size ", x.size(2));
  const int64_t B = x.size(0);
  check_index(row_fact, "row_fact", B, x);
  check_index(row_tok, "row_tok", B, x);
  check_range(row_fact, "row_fact", 0, clean.size(0));
  check_range(row_tok, "row_tok", -1, std::min(x.size(1), clean.size(1)));
}

namespace {

void add_noise_cpu(at::Tensor& x, const at::Tensor& noise, const at::Tensor& rows,
                   const at::Tensor& starts, const at::Tensor& lengths, bool replace) {
  check_add_noise_(x, noise, rows, starts, lengths);
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

void restore_rows_cpu(at::Tensor& x, const at::Tensor& clean, const at::Tensor& row_fact,
                      const at::Tensor& row_tok) {
  check_restore_rows_(x, clean, row_fact, row_tok);
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

}  // namespace
}  // namespace rome_fast

TORCH_LIBRARY_IMPL(rome_fast, CPU, m) {
  m.impl("add_noise_", &rome_fast::add_noise_cpu);
  m.impl("restore_rows_", &rome_fast::restore_rows_cpu);
}
