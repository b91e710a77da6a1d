// CUDA kernels of the fused ROME update: the rank-k weight update W += A Bᵀ (memory-bound: each W
// element read once and written once with 16-byte accesses, the small A/B factors staged through
// shared memory) and the per-column normalise + dot that turns C⁻¹k̄ into u and ⟨k*, u⟩.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype_utils.cuh"

namespace rome_fast::cuda {
namespace {

using detail::dispatch;
using detail::from_f;
using detail::to_f;

// Tile: a warp spans 32·VEC consecutive columns of one row group (coalesced 16-byte accesses), the
// 8 warps of a block span 8·RB rows; each thread owns RB rows × VEC columns of accumulators, so one
// B value read from shared memory feeds RB multiply-adds. k runs in chunks of KT staged columns.
constexpr int TX = 32, TY = 8, RB = 4, KT = 16;

template <typename T>
__global__ void __launch_bounds__(TX* TY)
rank_k_update_kernel(T* __restrict__ W, const float* __restrict__ A, const float* __restrict__ B,
                     int64_t rows, int64_t cols, int64_t n, bool vec_ok) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TC = TX * VEC, TR = TY * RB;
  constexpr int PAD = 4;  // keeps rows 16-byte aligned and spreads the transposing stores
  __shared__ __align__(16) float Bs[KT][TC + PAD];
  __shared__ __align__(16) float As[KT][TR];

  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TX + tx;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * TC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * TR;

  float acc[RB][VEC];
#pragma unroll
  for (int rr = 0; rr < RB; ++rr)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[rr][v] = 0.f;

  for (int64_t k0 = 0; k0 < n; k0 += KT) {
    const int kt = static_cast<int>(n - k0 < KT ? n - k0 : KT);
    // B is [cols, n] row-major: consecutive threads read consecutive k of one column, then move on.
    for (int idx = tid; idx < kt * TC; idx += TX * TY) {
      const int k = idx % kt, c = idx / kt;
      const int64_t gc = c0 + c;
      Bs[k][c] = gc < cols ? B[gc * n + k0 + k] : 0.f;
    }
    for (int idx = tid; idx < kt * TR; idx += TX * TY) {
      const int k = idx % kt, r = idx / kt;
      const int64_t gr = r0 + r;
      As[k][r] = gr < rows ? A[gr * n + k0 + k] : 0.f;
    }
    __syncthreads();
    for (int k = 0; k < kt; ++k) {
      float b[VEC];
#pragma unroll
      for (int v = 0; v < VEC; v += 4) {
        const float4 q = *reinterpret_cast<const float4*>(&Bs[k][tx * VEC + v]);
        b[v] = q.x, b[v + 1] = q.y, b[v + 2] = q.z, b[v + 3] = q.w;
      }
      const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * RB]);  // warp broadcast
      const float av[RB] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int rr = 0; rr < RB; ++rr)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[rr][v] = fmaf(av[rr], b[v], acc[rr][v]);
    }
    __syncthreads();
  }

  // Add the summed update to W last, rounding once per element.
  const int64_t c = c0 + tx * VEC;
#pragma unroll
  for (int rr = 0; rr < RB; ++rr) {
    const int64_t r = r0 + ty * RB + rr;
    if (r >= rows) break;
    T* w = W + r * cols + c;
    if (vec_ok && c + VEC <= cols) {
      alignas(16) T e[VEC];
      *reinterpret_cast<int4*>(e) = *reinterpret_cast<const int4*>(w);
#pragma unroll
      for (int v = 0; v < VEC; ++v) e[v] = from_f<T>(to_f(e[v]) + acc[rr][v]);
      *reinterpret_cast<int4*>(w) = *reinterpret_cast<const int4*>(e);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        if (c + v < cols) w[v] = from_f<T>(to_f(w[v]) + acc[rr][v]);
    }
  }
}

template <int N>
__device__ __forceinline__ void block_sum(double (&x)[N], double (*scratch)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    for (int off = 16; off > 0; off >>= 1) x[i] += __shfl_down_sync(0xffffffffu, x[i], off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[warp][i] = x[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w)
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] += scratch[w][i];
  }
}

// One block per column j: fp64 sums of ‖y‖², ⟨k*, y⟩, ‖k*‖², then U[:, j] = y / ‖y‖.
template <typename Y_t>
__global__ void normalize_dot_kernel(const Y_t* __restrict__ Y, const float* __restrict__ ks,
                                     float* __restrict__ U, double* __restrict__ stats, int64_t d,
                                     int64_t n) {
  __shared__ double scratch[32][3];
  __shared__ double inv_norm;
  const int64_t j = blockIdx.x;
  double s[3] = {0, 0, 0};
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const double y = static_cast<double>(Y[i * n + j]), k = ks[i * n + j];
    s[0] += y * y;
    s[1] += k * y;
    s[2] += k * k;
  }
  block_sum(s, scratch);
  if (threadIdx.x == 0) {
    const double norm = sqrt(s[0]);
    stats[j] = norm;
    stats[n + j] = s[1];
    stats[2 * n + j] = sqrt(s[2]);
    inv_norm = norm > 0 ? 1.0 / norm : 0.0;  // zero / non-finite norms are rejected by the caller
  }
  __syncthreads();
  const double inv = inv_norm;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    U[i * n + j] = static_cast<float>(static_cast<double>(Y[i * n + j]) * inv);
}

}  // namespace

// The launchers (declared for the dispatcher in register.cpp): device pointers, `stream` a
// cudaStream_t, a cudaError_t returned as int. Inputs are checked before they are called.

// W[r, c] += Σ_k A[r, k] B[c, k]; W [rows, cols] row-major of `dtype`, A [rows, n] and B [cols, n]
// fp32 row-major. fp32 sums, one rounding per W element.
int rank_k_update(void* W, const float* A, const float* B, int64_t rows, int64_t cols, int64_t n,
                  DType dtype, void* stream) {
  if (rows == 0 || cols == 0 || n == 0) return 0;
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    constexpr int VEC = 16 / sizeof(S);
    // 16-byte accesses need every row start aligned: an aligned base and cols % VEC == 0.
    const bool vec_ok = reinterpret_cast<uintptr_t>(W) % 16 == 0 && cols % VEC == 0;
    const dim3 block(TX, TY);
    const dim3 grid(static_cast<unsigned>((cols + TX * VEC - 1) / (TX * VEC)),
                    static_cast<unsigned>((rows + TY * RB - 1) / (TY * RB)));
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    rank_k_update_kernel<S><<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<S*>(W), A, B, rows, cols, n, vec_ok);
    return static_cast<int>(cudaGetLastError());
  });
}

// Per column j of Y [d, n] (fp64 when y_is_double, else fp32): U[:, j] = Y[:, j] / ‖Y[:, j]‖ (fp32),
// stats [3, n] fp64 = (‖Y[:, j]‖, ⟨kstar[:, j], Y[:, j]⟩, ‖kstar[:, j]‖).
int normalize_dot(const void* Y, bool y_is_double, const float* kstar, float* U, double* stats,
                  int64_t d, int64_t n, void* stream) {
  if (n == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (y_is_double)
    normalize_dot_kernel<double><<<static_cast<unsigned>(n), 256, 0, s>>>(
        static_cast<const double*>(Y), kstar, U, stats, d, n);
  else
    normalize_dot_kernel<float><<<static_cast<unsigned>(n), 256, 0, s>>>(
        static_cast<const float*>(Y), kstar, U, stats, d, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace rome_fast::cuda
