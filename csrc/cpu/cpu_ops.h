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

// ---- Solve + rank-k weight update (rank_one.cpp) ----
namespace rome_fast::cpu {

// W[r, c] += sum_k A[r, k] * B[c, k], in place. W [rows, cols] (fp32/fp16/bf16, contiguous),
// A [rows, n] and B [cols, n] fp32 contiguous. Sums in fp32, rounds each W element once.
void rank_k_update_(torch::Tensor W, const torch::Tensor& A, const torch::Tensor& B);

// Solves C Y = B in place for C = L Lᵀ: Y [d, n] fp64 row-major holds B on entry; L [d, d] is the
// lower Cholesky factor, row-major, fp32 or fp64. Sums in fp64; streams the triangle twice, no copy.
void cholesky_solve_(const torch::Tensor& L, torch::Tensor Y);

// Per column j of Y [d, n] (fp32 or fp64): U[:, j] = Y[:, j] / ||Y[:, j]|| (fp32 out), and
// stats [3, n] fp64 = (||Y[:, j]||, <kstar[:, j], Y[:, j]>, ||kstar[:, j]||), summed in fp64.
void normalize_dot(const torch::Tensor& Y, const torch::Tensor& kstar, torch::Tensor U,
                   torch::Tensor stats);

}  // namespace rome_fast::cpu

// ---- Fused block pieces (block_ops.cpp) ----
namespace rome_fast::cpu {

// Rotary embedding of one projection, written head-major: out[b, h, t, :] = x·cos + rotate_half(x)·sin
// of x = x[b, t, h·hd : (h+1)·hd]; x [B, T, H·hd], cos/sin [B or 1, T, hd], out [B, H, T, hd].
void rope_heads(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                torch::Tensor out);

}  // namespace rome_fast::cpu
