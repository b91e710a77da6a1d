// Fused pieces of a transformer block for the engine's block-by-block runs.
#include "cpu_ops.h"

#include <ATen/Parallel.h>

namespace rome_fast::cpu {

void rope_heads(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                torch::Tensor out) {
  const int64_t B = x.size(0), T = x.size(1), H = out.size(1), hd = out.size(3), half = hd / 2;
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
}

}  // namespace rome_fast::cpu
