// Shared device helpers for the stackwise kernels: dtype conversion and block-wide reductions.
// Header-only and torch-free, so each .cu file still compiles alone with `nvcc -c -arch=sm_90 file.cu`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace stackwise {

// Loads and stores go through fp32: every kernel accumulates in fp32 whatever the storage dtype.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);  // round-to-nearest-even, the same rounding as torch's .to(torch.bfloat16)
}

// Round an fp32 value to T's precision and back: lets a kernel reproduce the reference's intermediate casts.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide sum/max: reduce within each warp by shuffles, then the warp results through shared memory.
// Every thread of the block must call it (it synchronises) and every thread gets the result.
// blockDim.x must be a multiple of 32 (the launchers guarantee it) and at most 1024.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float partial[32];
  __shared__ float result;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    // 0 is neutral for both: the sum, and the max, which is only ever taken over absolute values.
    float w = lane < n_warps ? partial[lane] : 0.0f;
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  const float out = result;
  __syncthreads();  // result may be overwritten by the next call before every thread has read it
  return out;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max_abs(float v) { return block_reduce<true>(v); }

// Threads per row-block: one thread per element up to 512, a multiple of a warp. Wider rows loop.
inline int row_threads(int width) {
  int t = ((width + 31) / 32) * 32;
  return t < 32 ? 32 : (t > 512 ? 512 : t);
}

}  // namespace stackwise
