// Fused residual add + RMSNorm, forward and backward.
//
//   h = x + residual                 (stored: it is the residual stream the next block adds to)
//   y = weight * rmsnorm(h)          rmsnorm(h) = h * rstd,  rstd = 1 / sqrt(mean(h^2) + eps)
//
// Unfused, this reads x and residual, writes h, reads h again for the norm and writes y: the fused kernel
// reads each input once and writes each output once. One block per row; the row's sum of squares is a
// block reduction. Inputs are fp32 or bf16; all arithmetic is fp32. The per-row rstd (fp32) is kept for
// the backward so it does not recompute the reduction.
//
// Matching the torch reference (stackwise_cli.model.attention.RMSNorm) bit for bit where it can:
// - h is rounded to the storage dtype *before* the sum of squares, because the reference normalises the
//   rounded h it stored;
// - h * rstd is rounded to the storage dtype before the weight multiplies it, as `weight * xf.to(x.dtype)`.
//
// Backward, with n = h * rstd and g = dy * weight (per element), for one row of width D:
//   dh = rstd * (g - n * mean(g * n)) + dh_out     (dh_out: the gradient reaching h from the residual stream)
//   dx = dresidual = dh                             (h = x + residual)
//   dweight = sum over rows of dy * n
// dweight is a reduction over rows: each block accumulates its rows into its own fp32 row of `dw_partial`
// (grid-stride over rows, so no atomics), and the caller sums the (blocks, D) partials.
#include "common.cuh"

namespace stackwise {

template <typename T>
__global__ void add_rmsnorm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                       const float* __restrict__ weight, T* __restrict__ h_out,
                                       T* __restrict__ y_out, float* __restrict__ rstd_out, int width, float eps) {
  const long row = blockIdx.x;
  const T* xr = x + row * width;
  const T* rr = residual + row * width;
  T* hr = h_out + row * width;
  T* yr = y_out + row * width;

  float sum_sq = 0.0f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const float h = round_to<T>(to_float(xr[c]) + to_float(rr[c]));
    hr[c] = from_float<T>(h);
    sum_sq += h * h;
  }
  const float rstd = rsqrtf(block_sum(sum_sq) / width + eps);
  // Each thread re-reads only the h values it wrote itself, so no barrier is needed before this loop.
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const float n = round_to<T>(to_float(hr[c]) * rstd);
    yr[c] = from_float<T>(n * weight[c]);
  }
  if (threadIdx.x == 0) rstd_out[row] = rstd;
}

template <typename T>
__global__ void add_rmsnorm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh_out,
                                       const T* __restrict__ h, const float* __restrict__ weight,
                                       const float* __restrict__ rstd, T* __restrict__ dx,
                                       float* __restrict__ dw_partial, long rows, int width) {
  float* dw = dw_partial + static_cast<long>(blockIdx.x) * width;  // this block's own row: no races
  for (int c = threadIdx.x; c < width; c += blockDim.x) dw[c] = 0.0f;

  for (long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long off = row * width;
    const float r = rstd[row];
    float dot = 0.0f;  // sum(g * n) over the row
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
      const float n = to_float(h[off + c]) * r;
      const float g = to_float(dy[off + c]);
      dot += g * weight[c] * n;
      dw[c] += g * n;
    }
    const float mean_gn = block_sum(dot) / width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
      const float n = to_float(h[off + c]) * r;
      const float g = to_float(dy[off + c]) * weight[c];
      float d = r * (g - n * mean_gn);
      if (dh_out != nullptr) d += to_float(dh_out[off + c]);
      dx[off + c] = from_float<T>(d);
    }
  }
}

// Blocks for the backward: enough to fill the GPU, few enough that the (blocks, D) partials stay small.
inline int bwd_blocks(long rows) { return rows < 1024 ? static_cast<int>(rows) : 1024; }

}  // namespace stackwise

using namespace stackwise;

// Launchers: raw pointers, row-major contiguous (rows, width) tensors; weight and rstd are fp32.
// Return the launch error (cudaSuccess when the launch was accepted).
extern "C" cudaError_t stackwise_add_rmsnorm_fwd(const void* x, const void* residual, const float* weight, void* h,
                                                 void* y, float* rstd, long rows, int width, float eps, bool bf16,
                                                 cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = row_threads(width);
  if (bf16) {
    add_rmsnorm_fwd_kernel<__nv_bfloat16><<<rows, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(residual), weight,
        static_cast<__nv_bfloat16*>(h), static_cast<__nv_bfloat16*>(y), rstd, width, eps);
  } else {
    add_rmsnorm_fwd_kernel<float><<<rows, threads, 0, stream>>>(static_cast<const float*>(x),
                                                                static_cast<const float*>(residual), weight,
                                                                static_cast<float*>(h), static_cast<float*>(y),
                                                                rstd, width, eps);
  }
  return cudaGetLastError();
}

// The number of (width,) fp32 rows the caller must allocate for dw_partial.
extern "C" int stackwise_add_rmsnorm_bwd_blocks(long rows) { return bwd_blocks(rows); }

// dh_out may be null (no gradient reaches h from the residual stream).
extern "C" cudaError_t stackwise_add_rmsnorm_bwd(const void* dy, const void* dh_out, const void* h,
                                                 const float* weight, const float* rstd, void* dx, float* dw_partial,
                                                 long rows, int width, bool bf16, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = row_threads(width);
  const int blocks = bwd_blocks(rows);
  if (bf16) {
    add_rmsnorm_bwd_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(dh_out),
        static_cast<const __nv_bfloat16*>(h), weight, rstd, static_cast<__nv_bfloat16*>(dx), dw_partial, rows,
        width);
  } else {
    add_rmsnorm_bwd_kernel<float><<<blocks, threads, 0, stream>>>(
        static_cast<const float*>(dy), static_cast<const float*>(dh_out), static_cast<const float*>(h), weight, rstd,
        static_cast<float*>(dx), dw_partial, rows, width);
  }
  return cudaGetLastError();
}
