// CUDA kernels for fused pieces of a transformer block (the engine's block-by-block runs).
#include <cuda_runtime.h>

#include "dtype_utils.cuh"

namespace rome_fast::cuda {
namespace {

using detail::dispatch;
using detail::from_f;
using detail::to_f;

// One thread per output element of out [B, H, T, hd]; products rounded to the storage type as
// torch's x·cos + rotate_half(x)·sin rounds them.
template <typename S>
__global__ void rope_heads_kernel(const S* __restrict__ x, const S* __restrict__ cos,
                                  const S* __restrict__ sin, S* __restrict__ out, int64_t B,
                                  int64_t T, int64_t H, int64_t hd, int64_t cos_batch_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * H * T * hd) return;
  const int64_t d = i % hd, t = (i / hd) % T, h = (i / (hd * T)) % H, b = i / (hd * T * H);
  const int64_t half = hd / 2;
  const S* in = x + ((b * T + t) * H + h) * hd;
  const int64_t c = b * cos_batch_stride + t * hd + d;
  const float a = to_f(from_f<S>(to_f(in[d]) * to_f(cos[c])));
  const float partner = d < half ? -to_f(in[d + half]) : to_f(in[d - half]);
  const float r = to_f(from_f<S>(partner * to_f(sin[c])));
  out[i] = from_f<S>(a + r);
}

}  // namespace

// The launchers (declared for the dispatcher in register.cpp): device pointers, `stream` a
// cudaStream_t, a cudaError_t returned as int. Inputs are checked before they are called.

// out [B, H, T, hd] = x·cos + rotate_half(x)·sin per head of x [B, T, H·hd]; cos/sin [B, T, hd]
// (or [1, T, hd] with cos_broadcast). All of `dtype`, contiguous.
int rope_heads(const void* x, const void* cos, const void* sin, void* out, int64_t B, int64_t T,
               int64_t H, int64_t hd, bool cos_broadcast, DType dtype, void* stream) {
  const int64_t n = B * H * T * hd;
  if (n == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    rope_heads_kernel<S><<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const S*>(x), static_cast<const S*>(cos), static_cast<const S*>(sin),
        static_cast<S*>(out), B, T, H, hd, cos_broadcast ? 0 : T * hd);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace rome_fast::cuda
