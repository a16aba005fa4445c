// The TFT's numeric embedding out[n, v, :] = x[n, v] * w[v, :] + b[v, :] and its gradients (CPU, float32).
// Torch's broadcasting ops take 4-6 passes over the (rows, variables, width) output forward and backward; here
// the forward is one pass and the backward one pass over the gradient. Rows are cut into fixed blocks whose
// partial sums of grad_w and grad_b are added in block order: the same result on any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace vn30 {
namespace {

constexpr int64_t kBlockRows = 256;

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "numeric_embedding: x must be a contiguous float32 CPU tensor (rows, variables)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.is_contiguous() && w.scalar_type() == at::kFloat,
              "numeric_embedding: weight must be contiguous float32 (variables, width), as many variables as x");
}

}  // namespace

at::Tensor numeric_embedding_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check(x, w);
  TORCH_CHECK(b.sizes() == w.sizes() && b.is_contiguous() && b.scalar_type() == at::kFloat,
              "numeric_embedding: bias must be contiguous float32 (variables, width)");
  const int64_t rows = x.size(0), n_vars = x.size(1), width = w.size(1);
  auto out = at::empty({rows, n_vars, width}, x.options());
  const float *xs = x.data_ptr<float>(), *ws = w.data_ptr<float>(), *bs = b.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t v = 0; v < n_vars; ++v) {
        const float xv = xs[n * n_vars + v];
        float* o = os + (n * n_vars + v) * width;
        for (int64_t d = 0; d < width; ++d) o[d] = xv * ws[v * width + d] + bs[v * width + d];
      }
  });
  return out;
}

std::vector<at::Tensor> numeric_embedding_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w) {
  check(x, w);
  const int64_t rows = x.size(0), n_vars = x.size(1), width = w.size(1);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == at::IntArrayRef({rows, n_vars, width}),
              "numeric_embedding: grad must be contiguous (rows, variables, width)");
  const int64_t n_blocks = std::max<int64_t>(1, (rows + kBlockRows - 1) / kBlockRows), size = n_vars * width;
  auto grad_x = at::empty_like(x);
  auto partial_w = at::zeros({n_blocks, n_vars, width}, x.options());
  auto partial_b = at::zeros({n_blocks, n_vars, width}, x.options());
  const float *gs = grad.data_ptr<float>(), *xs = x.data_ptr<float>(), *ws = w.data_ptr<float>();
  float *gx = grad_x.data_ptr<float>(), *pw = partial_w.data_ptr<float>(), *pb = partial_b.data_ptr<float>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      float *bw = pw + block * size, *bb = pb + block * size;
      for (int64_t n = block * kBlockRows; n < std::min(rows, (block + 1) * kBlockRows); ++n)
        for (int64_t v = 0; v < n_vars; ++v) {
          const float xv = xs[n * n_vars + v];
          const float* g = gs + (n * n_vars + v) * width;
          float dx = 0.f;
          for (int64_t d = 0; d < width; ++d) {
            dx += g[d] * ws[v * width + d];
            bw[v * width + d] += g[d] * xv;
            bb[v * width + d] += g[d];
          }
          gx[n * n_vars + v] = dx;
        }
    }
  });
  return {grad_x, partial_w.sum(0), partial_b.sum(0)};
}

}  // namespace vn30
