// rope_heads, a fused piece of the transformer block of the engine's block-by-block runs: schema,
// argument checks (shared with the CUDA kernel, csrc/cuda/register.cpp) and CPU kernel.
// Contract and numerics: docs/kernels.md.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

TORCH_LIBRARY_FRAGMENT(rome_fast, m) {
  // out [B, H, T, hd] = x·cos + rotate_half(x)·sin for each head of x [B, T, H·hd];
  // cos/sin [B or 1, T, hd]
  m.def("rope_heads(Tensor x, Tensor cos, Tensor sin, int heads) -> Tensor");
}

namespace rome_fast {

void check_rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      int64_t heads) {
  check_float_states(x, "x", 3);
  RF_CHECK(heads > 0 && x.size(2) % heads == 0, "x width ", x.size(2), " is not a multiple of ",
           heads, " heads");
  const int64_t B = x.size(0), T = x.size(1), hd = x.size(2) / heads;
  RF_CHECK(hd % 2 == 0, "the head size ", hd, " must be even for rotary embeddings");
  for (const auto* t : {&cos, &sin}) {
    check_float_states(*t, "cos/sin", 3);
    RF_CHECK(t->scalar_type() == x.scalar_type(), "cos/sin dtype ", t->scalar_type(), " != x dtype ",
             x.scalar_type());
    check_same_device(*t, "cos/sin", x, "x");
    RF_CHECK((t->size(0) == B || t->size(0) == 1) && t->size(1) == T && t->size(2) == hd,
             "cos/sin must be [", B, " or 1, ", T, ", ", hd, "], got ", t->sizes());
  }
  RF_CHECK(cos.sizes() == sin.sizes(), "cos ", cos.sizes(), " and sin ", sin.sizes(), " differ");
}

namespace {

at::Tensor rope_heads_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          int64_t heads) {
  check_rope_heads(x, cos, sin, heads);
  const int64_t B = x.size(0), T = x.size(1), H = heads, hd = x.size(2) / heads, half = hd / 2;
  at::Tensor out = at::empty({B, H, T, hd}, x.options());
  const int64_t cos_batch_stride = cos.size(0) == 1 ? 0 : T * hd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_heads", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * T, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t bt = lo; bt < hi; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const scalar_t* c = cp + b * cos_batch_stride + t * hd;
        const scalar_t* s = sp + b * cos_batch_stride + t * hd;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* in = xp + (bt * H + h) * hd;
          scalar_t* o = op + ((b * H + h) * T + t) * hd;
          // x·cos + rotate_half(x)·sin with rotate_half(x) = (−x₂, x₁), each product rounded as
          // torch rounds it in the storage type
          for (int64_t d = 0; d < half; ++d) {
            const float a = static_cast<float>(static_cast<scalar_t>(in[d] * c[d]));
            const float r = static_cast<float>(static_cast<scalar_t>(-in[d + half] * s[d]));
            o[d] = static_cast<scalar_t>(a + r);
          }
          for (int64_t d = half; d < hd; ++d) {
            const float a = static_cast<float>(static_cast<scalar_t>(in[d] * c[d]));
            const float r = static_cast<float>(static_cast<scalar_t>(in[d - half] * s[d]));
            o[d] = static_cast<scalar_t>(a + r);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace rome_fast

TORCH_LIBRARY_IMPL(rome_fast, CPU, m) { m.impl("rope_heads", &rome_fast::rope_heads_cpu); }
