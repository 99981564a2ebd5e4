// Per-token fp8 (e4m3) quantisation of activation caches, and the way back.
//
// A cached hidden state is stored bf16 today (2 bytes a value). In e4m3 it is 1 byte a value plus one fp32
// scale per token (row): scale = amax(|row|) / 448, 448 being e4m3's largest finite value, so each row uses
// the whole e4m3 range and one outlier token does not crush the precision of the others.
//
//   quantize:   code[i] = e4m3(x[i] / scale)        (round to nearest even, saturating to +-448)
//   dequantize: x'[i]   = float(code[i]) * scale    (then to fp32 or bf16)
//
// An all-zero row has amax 0: its scale is set to 1 (not 0, which would divide by zero), and its codes are 0.
// The division (not a multiply by 1/scale) and the rounding mode match the torch reference
// (`(x.float() / scale).to(torch.float8_e4m3fn)`) so the codes agree exactly.
// One block per row for the quantize: the row amax is a block reduction. Dequantize is elementwise.
#include <cuda_fp8.h>
#include <stdint.h>

#include "common.cuh"

namespace stackwise {

constexpr float kE4M3Max = 448.0f;

template <typename T>
__global__ void fp8_quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes, float* __restrict__ scales,
                                    int width) {
  const long row = blockIdx.x;
  const T* xr = x + row * width;
  float amax = 0.0f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) amax = fmaxf(amax, fabsf(to_float(xr[c])));
  amax = block_max_abs(amax);
  const float scale = amax > 0.0f ? amax / kE4M3Max : 1.0f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    // __nv_fp8_e4m3(float) rounds to nearest even and saturates (__NV_SATFINITE): x / scale can exceed 448 by
    // an ulp of fp32 rounding, and must land on 448, not on NaN.
    const __nv_fp8_e4m3 q(to_float(xr[c]) / scale);
    codes[row * width + c] = q.__x;
  }
  if (threadIdx.x == 0) scales[row] = scale;
}

template <typename T>
__global__ void fp8_dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                      T* __restrict__ out, long total, int width) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  __nv_fp8_e4m3 q;
  q.__x = codes[i];
  out[i] = from_float<T>(static_cast<float>(q) * scales[i / width]);
}

}  // namespace stackwise

using namespace stackwise;

// x (rows, width) contiguous fp32 or bf16 -> codes (rows, width) uint8 holding e4m3 bits, scales (rows,) fp32.
extern "C" cudaError_t stackwise_fp8_quantize(const void* x, uint8_t* codes, float* scales, long rows, int width,
                                              bool bf16, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int threads = row_threads(width);
  if (bf16) {
    fp8_quantize_kernel<__nv_bfloat16>
        <<<rows, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), codes, scales, width);
  } else {
    fp8_quantize_kernel<float><<<rows, threads, 0, stream>>>(static_cast<const float*>(x), codes, scales, width);
  }
  return cudaGetLastError();
}

// codes (rows, width) uint8 e4m3 bits, scales (rows,) fp32 -> out (rows, width) fp32 or bf16.
extern "C" cudaError_t stackwise_fp8_dequantize(const uint8_t* codes, const float* scales, void* out, long rows,
                                                int width, bool bf16, cudaStream_t stream) {
  const long total = rows * width;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const long blocks = (total + threads - 1) / threads;
  if (bf16) {
    fp8_dequantize_kernel<__nv_bfloat16>
        <<<blocks, threads, 0, stream>>>(codes, scales, static_cast<__nv_bfloat16*>(out), total, width);
  } else {
    fp8_dequantize_kernel<float><<<blocks, threads, 0, stream>>>(codes, scales, static_cast<float*>(out), total, width);
  }
  return cudaGetLastError();
}
