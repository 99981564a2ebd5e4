// The torch binding: C++ wrappers that check devices, dtypes, shapes and contiguity, allocate the outputs and
// call the raw-pointer launchers of the .cu files on the current CUDA stream. Built lazily by
// stackwise_cli.kernels.build.load_extension(); the Python side (stackwise_cli.kernels.ops) wraps these in
// autograd functions and holds them to the torch references.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <torch/extension.h>

#include <optional>

extern "C" {
cudaError_t stackwise_add_rmsnorm_fwd(const void* x, const void* residual, const float* weight, void* h, void* y,
                                      float* rstd, long rows, int width, float eps, bool bf16, cudaStream_t stream);
int stackwise_add_rmsnorm_bwd_blocks(long rows);
cudaError_t stackwise_add_rmsnorm_bwd(const void* dy, const void* dh_out, const void* h, const float* weight,
                                      const float* rstd, void* dx, float* dw_partial, long rows, int width, bool bf16,
                                      cudaStream_t stream);
cudaError_t stackwise_rotary(const void* q, const void* k, void* q_out, void* k_out, const float* cos,
                             const float* sin, long q_rows, long k_rows, int seq_len, int width, bool backward,
                             bool bf16, cudaStream_t stream);
cudaError_t stackwise_fp8_quantize(const void* x, uint8_t* codes, float* scales, long rows, int width, bool bf16,
                                   cudaStream_t stream);
cudaError_t stackwise_fp8_dequantize(const uint8_t* codes, const float* scales, void* out, long rows, int width,
                                     bool bf16, cudaStream_t stream);
}

namespace {

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// fp32 or bf16 activations; returns whether they are bf16.
bool check_float(const torch::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, name,
              " must be float32 or bfloat16; got ", t.scalar_type());
  return t.scalar_type() == torch::kBFloat16;
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* name) {
  TORCH_CHECK(a.sizes() == b.sizes(), name, " must have shape ", a.sizes(), "; got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must be ", a.scalar_type(), "; got ", b.scalar_type());
}

void check_fp32_vector(const torch::Tensor& t, int64_t n, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32; got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements; got ", t.numel());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

int width_of(const torch::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) > 0, "the last dimension must be non-empty");
  TORCH_CHECK(t.size(-1) <= INT32_MAX, "the last dimension is too wide");
  return static_cast<int>(t.size(-1));
}

// x, residual (..., D) -> (h, y, rstd): h = x + residual, y = rmsnorm(h) * weight, rstd (rows,) fp32.
std::vector<torch::Tensor> add_rmsnorm_forward(const torch::Tensor& x, const torch::Tensor& residual,
                                               const torch::Tensor& weight, double eps) {
  const bool bf16 = check_float(x, "x");
  check_cuda(residual, "residual");
  check_same(x, residual, "residual");
  const int width = width_of(x);
  check_fp32_vector(weight, width, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / width;
  auto h = torch::empty_like(x);
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({rows}, x.options().dtype(torch::kFloat32));
  check_launch(stackwise_add_rmsnorm_fwd(x.data_ptr(), residual.data_ptr(), weight.data_ptr<float>(), h.data_ptr(),
                                         y.data_ptr(), rstd.data_ptr<float>(), rows, width, static_cast<float>(eps),
                                         bf16, c10::cuda::getCurrentCUDAStream()),
               "add_rmsnorm forward");
  return {h, y, rstd};
}

// (dy, dh_out or None, h, weight, rstd) -> (dx, dweight fp32). dx is the gradient of both x and residual.
std::vector<torch::Tensor> add_rmsnorm_backward(const torch::Tensor& dy, const std::optional<torch::Tensor>& dh_out,
                                                const torch::Tensor& h, const torch::Tensor& weight,
                                                const torch::Tensor& rstd) {
  const bool bf16 = check_float(h, "h");
  check_cuda(dy, "dy");
  check_same(h, dy, "dy");
  if (dh_out.has_value()) {
    check_cuda(*dh_out, "dh_out");
    check_same(h, *dh_out, "dh_out");
  }
  const int width = width_of(h);
  const int64_t rows = h.numel() / width;
  check_fp32_vector(weight, width, "weight");
  check_fp32_vector(rstd, rows, "rstd");
  const c10::cuda::CUDAGuard guard(h.device());
  auto dx = torch::empty_like(h);
  auto partial = torch::empty({stackwise_add_rmsnorm_bwd_blocks(rows), width}, h.options().dtype(torch::kFloat32));
  check_launch(stackwise_add_rmsnorm_bwd(dy.data_ptr(), dh_out.has_value() ? dh_out->data_ptr() : nullptr,
                                         h.data_ptr(), weight.data_ptr<float>(), rstd.data_ptr<float>(),
                                         dx.data_ptr(), partial.data_ptr<float>(), rows, width, bf16,
                                         c10::cuda::getCurrentCUDAStream()),
               "add_rmsnorm backward");
  // The per-block partial sums of dy * n; a (blocks, D) -> (D,) sum is cheap next to the kernel.
  auto dw = rows == 0 ? torch::zeros({width}, partial.options()) : partial.sum(0);
  return {dx, dw};
}

// q (..., T, D), k (..., T, D); cos, sin (T, D) fp32 -> rotated (q, k). backward=true: the transpose.
std::vector<torch::Tensor> rotary(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                  const torch::Tensor& sin, bool backward) {
  const bool bf16 = check_float(q, "q");
  check_float(k, "k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "k must be ", q.scalar_type(), "; got ", k.scalar_type());
  TORCH_CHECK(q.dim() >= 2 && k.dim() >= 2, "q and k must be (..., T, D)");
  const int width = width_of(q);
  const int64_t seq_len = q.size(-2);
  TORCH_CHECK(width % 2 == 0, "the rotated width must be even; got ", width);
  TORCH_CHECK(k.size(-1) == width && k.size(-2) == seq_len, "k must end in (", seq_len, ", ", width, "); got ",
              k.sizes());
  check_fp32_vector(cos, seq_len * width, "cos");
  check_fp32_vector(sin, seq_len * width, "sin");
  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = torch::empty_like(q);
  auto k_out = torch::empty_like(k);
  check_launch(stackwise_rotary(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), cos.data_ptr<float>(),
                                sin.data_ptr<float>(), q.numel() / width, k.numel() / width,
                                static_cast<int>(seq_len), width, backward, bf16, c10::cuda::getCurrentCUDAStream()),
               "rotary");
  return {q_out, k_out};
}

// x (..., D) fp32/bf16 -> (codes uint8 (..., D) holding e4m3 bits, scales fp32 (...)).
std::vector<torch::Tensor> fp8_quantize(const torch::Tensor& x) {
  const bool bf16 = check_float(x, "x");
  const int width = width_of(x);
  const int64_t rows = x.numel() / width;
  const c10::cuda::CUDAGuard guard(x.device());
  auto codes = torch::empty(x.sizes(), x.options().dtype(torch::kUInt8));
  auto scales = torch::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(torch::kFloat32));
  check_launch(stackwise_fp8_quantize(x.data_ptr(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), rows, width,
                                      bf16, c10::cuda::getCurrentCUDAStream()),
               "fp8 quantize");
  return {codes, scales};
}

// codes uint8 (..., D), scales fp32 (...) -> values (..., D) in bf16 (to_bf16) or fp32.
torch::Tensor fp8_dequantize(const torch::Tensor& codes, const torch::Tensor& scales, bool to_bf16) {
  check_cuda(codes, "codes");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8, "codes must be uint8; got ", codes.scalar_type());
  const int width = width_of(codes);
  const int64_t rows = codes.numel() / width;
  check_fp32_vector(scales, rows, "scales");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto out = torch::empty(codes.sizes(), codes.options().dtype(to_bf16 ? torch::kBFloat16 : torch::kFloat32));
  check_launch(stackwise_fp8_dequantize(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), out.data_ptr(), rows,
                                        width, to_bf16, c10::cuda::getCurrentCUDAStream()),
               "fp8 dequantize");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stackwise CUDA kernels (see kernels/README.md); call through stackwise_cli.kernels";
  m.def("add_rmsnorm_forward", &add_rmsnorm_forward, "h = x + residual; y = rmsnorm(h) * weight; rstd per row");
  m.def("add_rmsnorm_backward", &add_rmsnorm_backward, "(dx, dweight) of the fused add + RMSNorm");
  m.def("rotary", &rotary, "rotate-half RoPE on q and k (backward=True: the transpose)");
  m.def("fp8_quantize", &fp8_quantize, "per-row e4m3 codes (uint8) and fp32 scales");
  m.def("fp8_dequantize", &fp8_dequantize, "e4m3 codes and scales back to fp32 or bf16");
}
