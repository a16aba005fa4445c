// The TFT's numeric embedding out[n, v, :] = x[n, v] * w[v, :] + b[v, :] and its gradients (CPU, float32, width 8).
// Torch's broadcasting ops take 4-6 passes over the (rows, variables, 8) output forward and backward; here the
// forward is one pass and the backward one pass over the gradient, each (row, variable) one 8-float vector.
// Rows are cut into fixed blocks whose partial sums of grad_w and grad_b are added in block order: the same
// result on any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace vn30 {
namespace {

constexpr int64_t kBlockRows = 256;
constexpr int kWidth = 8;  // the only width compiled (the TFT's variable width)
typedef float v8 __attribute__((vector_size(kWidth * sizeof(float))));

inline v8 load(const float* src) {
  v8 v;
  std::memcpy(&v, src, sizeof v);
  return v;
}

inline void store(v8 v, float* dst) { std::memcpy(dst, &v, sizeof v); }

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "numeric_embedding: x must be a contiguous float32 CPU tensor (rows, variables)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) == kWidth && w.is_contiguous() &&
                  w.scalar_type() == at::kFloat,
              "numeric_embedding: weight must be contiguous float32 (variables of x, 8)");
}

}  // namespace

at::Tensor numeric_embedding_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check(x, w);
  TORCH_CHECK(b.sizes() == w.sizes() && b.is_contiguous() && b.scalar_type() == at::kFloat,
              "numeric_embedding: bias must be contiguous float32 (variables, 8)");
  const int64_t rows = x.size(0), n_vars = x.size(1);
  auto out = at::empty({rows, n_vars, kWidth}, x.options());
  const float *xs = x.data_ptr<float>(), *ws = w.data_ptr<float>(), *bs = b.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t v = 0; v < n_vars; ++v)
        store(xs[n * n_vars + v] * load(ws + v * kWidth) + load(bs + v * kWidth), os + (n * n_vars + v) * kWidth);
  });
  return out;
}

std::vector<at::Tensor> numeric_embedding_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w) {
  check(x, w);
  const int64_t rows = x.size(0), n_vars = x.size(1);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == at::IntArrayRef({rows, n_vars, kWidth}),
              "numeric_embedding: grad must be contiguous (rows, variables, 8)");
  const int64_t n_blocks = std::max<int64_t>(1, (rows + kBlockRows - 1) / kBlockRows);
  auto grad_x = at::empty_like(x);
  auto partial_w = at::empty({n_blocks, n_vars, kWidth}, x.options());
  auto partial_b = at::empty({n_blocks, n_vars, kWidth}, x.options());
  const float *gs = grad.data_ptr<float>(), *xs = x.data_ptr<float>(), *ws = w.data_ptr<float>();
  float *gx = grad_x.data_ptr<float>(), *pw = partial_w.data_ptr<float>(), *pb = partial_b.data_ptr<float>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t first = block * kBlockRows, last = std::min(rows, first + kBlockRows);
      // one variable at a time over the block's rows (in cache): its sums stay in registers
      for (int64_t v = 0; v < n_vars; ++v) {
        const v8 wv = load(ws + v * kWidth);
        v8 sum_w = {}, sum_b = {};
        for (int64_t n = first; n < last; ++n) {
          const float xv = xs[n * n_vars + v];
          const v8 g = load(gs + (n * n_vars + v) * kWidth), gw = g * wv;
          gx[n * n_vars + v] = ((gw[0] + gw[1]) + (gw[2] + gw[3])) + ((gw[4] + gw[5]) + (gw[6] + gw[7]));
          sum_w += g * xv;
          sum_b += g;
        }
        store(sum_w, pw + (block * n_vars + v) * kWidth);
        store(sum_b, pb + (block * n_vars + v) * kWidth);
      }
    }
  });
  return {grad_x, partial_w.sum(0), partial_b.sum(0)};
}

}  // namespace vn30
