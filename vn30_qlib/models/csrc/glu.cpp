// The gated linear unit of a linear map's output x = [a, b] (last dimension), with that map's bias c = [ca, cb]
// and the residual r the TFT adds to it: r + (a + ca) * sigmoid(b + cb), and its gradient of x (CPU, float32).
// Torch's glu_backward recomputes the sigmoid over the strided half b in a slow loop, and the bias and residual
// are two more passes (addmm's copy of the bias into its output, the add); here each row's halves are read as
// vectors of kLanes features (the last partial vector through a zero-padded copy), the sigmoid is the vector
// fast_exp, and the bias and residual are added on the way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace vn30 {
namespace {

inline vf sigmoid(vf x) { return 1.f / (1.f + fast_exp(-x)); }

void check(const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "glu: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(x.size(-1) % 2 == 0, "glu: the last dimension must be even, got ", x.size(-1));
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1) && bias.is_contiguous() &&
                  bias.scalar_type() == at::kFloat,
              "glu: bias must be contiguous float32 (", x.size(-1), ",)");
}

}  // namespace

at::Tensor glu_forward(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual) {
  check(x, bias);
  const int64_t width = x.size(-1) / 2, rows = width ? x.numel() / (2 * width) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(shape) && residual.is_contiguous() &&
                  residual.scalar_type() == at::kFloat,
              "glu: residual must be contiguous float32, shaped like the output");
  auto out = at::empty(shape, x.options());
  const float *xs = x.data_ptr<float>(), *cs = bias.data_ptr<float>(), *rs = residual.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *a = xs + r * 2 * width, *b = a + width;
      for (int64_t i = 0; i < width; i += kLanes) {
        const int count = (int)std::min<int64_t>(kLanes, width - i);
        const vf gate = sigmoid(load_lanes(b + i, count) + load_lanes(cs + width + i, count));
        const vf value = load_lanes(a + i, count) + load_lanes(cs + i, count);
        store_lanes(load_lanes(rs + r * width + i, count) + value * gate, os + r * width + i, count);
      }
    }
  });
  return out;
}

at::Tensor glu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias) {
  check(x, bias);
  const int64_t width = x.size(-1) / 2, rows = width ? x.numel() / (2 * width) : 0;
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == rows * width && grad.size(-1) == width,
              "glu: grad must be contiguous, shaped like the output");
  auto grad_x = at::empty_like(x);
  const float *xs = x.data_ptr<float>(), *cs = bias.data_ptr<float>(), *gs = grad.data_ptr<float>();
  float* gx = grad_x.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *a = xs + r * 2 * width, *b = a + width, *g = gs + r * width;
      float *ga = gx + r * 2 * width, *gb = ga + width;
      for (int64_t i = 0; i < width; i += kLanes) {
        const int count = (int)std::min<int64_t>(kLanes, width - i);
        const vf s = sigmoid(load_lanes(b + i, count) + load_lanes(cs + width + i, count));
        const vf g_times_s = load_lanes(g + i, count) * s;
        store_lanes(g_times_s, ga + i, count);
        store_lanes(g_times_s * (load_lanes(a + i, count) + load_lanes(cs + i, count)) * (1.f - s), gb + i, count);
      }
    }
  });
  return grad_x;
}

}  // namespace vn30
