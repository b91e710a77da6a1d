// CPU implementations of the compiled core. Inputs are validated in bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace rome_fast::cpu {

// x[rows[n], starts[n] + l, :] (+)= noise[n, l, :] for l < lengths[n].
void add_noise_(torch::Tensor x, const torch::Tensor& noise, const torch::Tensor& rows,
                const torch::Tensor& starts, const torch::Tensor& lengths, bool replace);

// x[b, row_tok[b], :] = clean[row_fact[b], row_tok[b], :] wherever row_tok[b] >= 0.
void restore_rows_(torch::Tensor x, const torch::Tensor& clean, const torch::Tensor& row_fact,
                   const torch::Tensor& row_tok);

}  // namespace rome_fast::cpu
