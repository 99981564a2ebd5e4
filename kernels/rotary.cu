// Rotary position embedding ("rotate half" layout) applied to q and k in one launch, forward and backward.
//
// For a row x of width D at position t, with half = D / 2 and the tables cos, sin (T, D):
//   y[i]        = x[i]        * cos[t, i]        - x[i + half] * sin[t, i]
//   y[i + half] = x[i + half] * cos[t, i + half] + x[i]        * sin[t, i + half]
// which is stackwise_cli.model.attention.apply_rope: x * cos + rotate_half(x) * sin.
//
// The backward is the transpose of that linear map:
//   dx[i]        = g[i]        * cos[t, i]        + g[i + half] * sin[t, i + half]
//   dx[i + half] = g[i + half] * cos[t, i + half] - g[i]        * sin[t, i]
// With rope tables (both halves hold the same angles) this is the rotation by -angle.
//
// q and k are contiguous (..., T, D) tensors viewed as rows; row r sits at position r % T. One thread per
// (row, pair): each thread reads its two elements once and writes two, so the kernel is purely bandwidth.
// Arithmetic is fp32; for bf16 inputs the tables are first rounded to bf16, as the reference's cos.to(x.dtype).
#include "common.cuh"

namespace stackwise {

template <typename T, bool kBackward>
__global__ void rotary_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ q_out,
                              T* __restrict__ k_out, const float* __restrict__ cos, const float* __restrict__ sin,
                              long q_rows, long k_rows, int seq_len, int width) {
  const int half = width / 2;
  const long pair = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long total = (q_rows + k_rows) * half;
  if (pair >= total) return;
  long row = pair / half;
  const int i = static_cast<int>(pair % half);
  // Rows [0, q_rows) are q's, the rest k's: one launch covers both tensors.
  const T* src = q;
  T* dst = q_out;
  if (row >= q_rows) {
    row -= q_rows;
    src = k;
    dst = k_out;
  }
  const long t = row % seq_len;
  const float c_lo = round_to<T>(cos[t * width + i]), c_hi = round_to<T>(cos[t * width + i + half]);
  const float s_lo = round_to<T>(sin[t * width + i]), s_hi = round_to<T>(sin[t * width + i + half]);
  const float lo = to_float(src[row * width + i]);
  const float hi = to_float(src[row * width + i + half]);
  float out_lo, out_hi;
  if (kBackward) {
    out_lo = lo * c_lo + hi * s_hi;
    out_hi = hi * c_hi - lo * s_lo;
  } else {
    out_lo = lo * c_lo - hi * s_lo;
    out_hi = hi * c_hi + lo * s_hi;
  }
  dst[row * width + i] = from_float<T>(out_lo);
  dst[row * width + i + half] = from_float<T>(out_hi);
}

template <typename T>
cudaError_t launch_rotary(const void* q, const void* k, void* q_out, void* k_out, const float* cos, const float* sin,
                          long q_rows, long k_rows, int seq_len, int width, bool backward, cudaStream_t stream) {
  const long total = (q_rows + k_rows) * (width / 2);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const long blocks = (total + threads - 1) / threads;
  auto* qi = static_cast<const T*>(q);
  auto* ki = static_cast<const T*>(k);
  auto* qo = static_cast<T*>(q_out);
  auto* ko = static_cast<T*>(k_out);
  if (backward) {
    rotary_kernel<T, true><<<blocks, threads, 0, stream>>>(qi, ki, qo, ko, cos, sin, q_rows, k_rows, seq_len, width);
  } else {
    rotary_kernel<T, false><<<blocks, threads, 0, stream>>>(qi, ki, qo, ko, cos, sin, q_rows, k_rows, seq_len, width);
  }
  return cudaGetLastError();
}

}  // namespace stackwise

// Launcher: q (q_rows, width) and k (k_rows, width) contiguous, rows ordered (..., T) so row % seq_len is the
// position; cos and sin fp32 (seq_len, width); width even. backward=true applies the transpose (rotation by -angle).
extern "C" cudaError_t stackwise_rotary(const void* q, const void* k, void* q_out, void* k_out, const float* cos,
                                        const float* sin, long q_rows, long k_rows, int seq_len, int width,
                                        bool backward, bool bf16, cudaStream_t stream) {
  if (bf16) {
    return stackwise::launch_rotary<__nv_bfloat16>(q, k, q_out, k_out, cos, sin, q_rows, k_rows, seq_len, width,
                                                   backward, stream);
  }
  return stackwise::launch_rotary<float>(q, k, q_out, k_out, cos, sin, q_rows, k_rows, seq_len, width, backward,
                                         stream);
}
