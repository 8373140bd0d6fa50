// Device helpers shared by the CUDA kernels of the NCE loss: warp reductions and the store
// of a float32 value as the gradient buffer's type. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace amdim_kernels {

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the warp's sum
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename G>
__device__ __forceinline__ void store_as(G* g, float v);
template <>
__device__ __forceinline__ void store_as<float>(float* g, float v) { *g = v; }
template <>
__device__ __forceinline__ void store_as<__nv_bfloat16>(__nv_bfloat16* g, float v) { *g = __float2bfloat16(v); }
template <>
__device__ __forceinline__ void store_as<__half>(__half* g, float v) { *g = __float2half(v); }

// The power of two a float16 G is stored times (launch_nce_grad_scale), or 1 without one.
__device__ __forceinline__ float grad_scale_of(const float* g_scale) { return g_scale ? *g_scale : 1.f; }

}  // namespace amdim_kernels
