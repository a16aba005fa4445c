// One LSTM layer over a batch-first sequence (torch's nn.LSTM maths and gate order i, f, g, o), forward and
// backward (CPU, float32). oneDNN's layer took about 18 ms forward + backward of the TFT encoder's (256, 20, 64) on
// this project's CPU; here the input projection of every step is one matmul, each step one (rows, H) x (H, 4H)
// matmul and one vector pass over its gates, and the backward's weight and input gradients three matmuls over all
// steps at once. The forward saves the activated gates and the cell states for the backward, which overwrites the
// gates with the gradients of the pre-activations, step by step, so it runs once per forward: a second 5 MB buffer
// for those made a training chunk ~2.4 ms slower (its memory, its pages' first-touch faults).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace vn30 {
namespace {

inline vf sigmoid(vf x) { return 1.f / (1.f + fast_exp(-x)); }
inline vf tanh_(vf x) { return 2.f * sigmoid(x + x) - 1.f; }

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(), "lstm_layer: ", name,
              " must be a contiguous float32 CPU tensor");
}

// Rows of one step: the pre-activations gates + h_proj + bias (each row 4H wide, `gates` rows `gate_stride` apart,
// overwritten by the activated gates) give the cell state c = f c_prev + i g and the output h = o tanh(c) (rows
// `state_stride` apart; c_prev rows `prev_stride` apart).
void step_forward(float* gates, int64_t gate_stride, const float* h_proj, const float* bias, const float* c_prev,
                  int64_t prev_stride, float* c, float* h, int64_t state_stride, int64_t rows, int64_t hidden) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* hp = h_proj + r * 4 * hidden;
      float* g = gates + r * gate_stride;
      for (int64_t j = 0; j < hidden; j += kLanes) {
        const int n = (int)std::min<int64_t>(kLanes, hidden - j);
        auto pre = [&](int64_t k) {
          const int64_t at = k * hidden + j;
          return load_lanes(g + at, n) + load_lanes(hp + at, n) + load_lanes(bias + at, n);
        };
        const vf i = sigmoid(pre(0)), f = sigmoid(pre(1)), gg = tanh_(pre(2)), o = sigmoid(pre(3));
        const vf cell = f * load_lanes(c_prev + r * prev_stride + j, n) + i * gg;
        store_lanes(i, g + j, n);
        store_lanes(f, g + hidden + j, n);
        store_lanes(gg, g + 2 * hidden + j, n);
        store_lanes(o, g + 3 * hidden + j, n);
        store_lanes(cell, c + r * state_stride + j, n);
        store_lanes(o * tanh_(cell), h + r * state_stride + j, n);
      }
    }
  });
}

// The backward of one step: from the gradient of its output h (grad_out + dh, dh from the next step) and of its cell
// state (dc, in place: left as the gradient of the previous cell state), the gradient of its pre-activations,
// written over its activated gates.
void step_backward(const float* grad_out, int64_t grad_stride, const float* dh, float* gates, int64_t gate_stride,
                   const float* c, int64_t c_stride, const float* c_prev, int64_t prev_stride, float* dc,
                   int64_t rows, int64_t hidden) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float *g = gates + r * gate_stride, *d = g;
      for (int64_t j = 0; j < hidden; j += kLanes) {
        const int n = (int)std::min<int64_t>(kLanes, hidden - j);
        const vf i = load_lanes(g + j, n), f = load_lanes(g + hidden + j, n), gg = load_lanes(g + 2 * hidden + j, n),
                 o = load_lanes(g + 3 * hidden + j, n);
        const vf grad_h = load_lanes(grad_out + r * grad_stride + j, n) + load_lanes(dh + r * hidden + j, n);
        const vf tc = tanh_(load_lanes(c + r * c_stride + j, n));
        const vf grad_c = load_lanes(dc + r * hidden + j, n) + grad_h * o * (1.f - tc * tc);
        store_lanes(grad_c * gg * i * (1.f - i), d + j, n);
        store_lanes(grad_c * load_lanes(c_prev + r * prev_stride + j, n) * f * (1.f - f), d + hidden + j, n);
        store_lanes(grad_c * i * (1.f - gg * gg), d + 2 * hidden + j, n);
        store_lanes(grad_h * tc * o * (1.f - o), d + 3 * hidden + j, n);
        store_lanes(grad_c * f, dc + r * hidden + j, n);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> lstm_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                           const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias) {
  for (auto [t, name] : {std::pair{&x, "x"}, {&h0, "h0"}, {&c0, "c0"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"},
                         {&bias, "bias"}})
    check(*t, name);
  TORCH_CHECK(x.dim() == 3, "lstm_layer: x must be (rows, steps, inputs)");
  const int64_t rows = x.size(0), steps = x.size(1), hidden = h0.size(1);
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({rows, hidden}) && c0.sizes() == h0.sizes(),
              "lstm_layer: h0 and c0 must be (rows, hidden)");
  TORCH_CHECK(w_ih.sizes() == at::IntArrayRef({4 * hidden, x.size(2)}) &&
                  w_hh.sizes() == at::IntArrayRef({4 * hidden, hidden}) &&
                  bias.sizes() == at::IntArrayRef({4 * hidden}),
              "lstm_layer: weights must be (4 hidden, inputs), (4 hidden, hidden) and bias (4 hidden,)");
  TORCH_CHECK(steps >= 1, "lstm_layer: the sequence needs at least one step");
  // every step's input projection at once, (rows, steps, 4H), then activated in place step by step
  auto gates = at::mm(x.reshape({rows * steps, x.size(2)}), w_ih.t()).view({rows, steps, 4 * hidden});
  auto out = at::empty({rows, steps, hidden}, x.options());
  auto cells = at::empty({rows, steps, hidden}, x.options());
  auto h_proj = at::empty({rows, 4 * hidden}, x.options());
  const int64_t s4 = steps * 4 * hidden, sh = steps * hidden;
  for (int64_t t = 0; t < steps; ++t) {
    at::mm_out(h_proj, t == 0 ? h0 : out.select(1, t - 1), w_hh.t());
    const float* c_prev = t == 0 ? c0.data_ptr<float>() : cells.data_ptr<float>() + (t - 1) * hidden;
    step_forward(gates.data_ptr<float>() + t * 4 * hidden, s4, h_proj.data_ptr<float>(), bias.data_ptr<float>(),
                 c_prev, t == 0 ? hidden : sh, cells.data_ptr<float>() + t * hidden,
                 out.data_ptr<float>() + t * hidden, sh, rows, hidden);
  }
  return {out, out.select(1, steps - 1).contiguous(), cells.select(1, steps - 1).contiguous(), gates, cells};
}

// Gradients of x, h0, c0, w_ih, w_hh and the bias, from those of the output sequence and the final h and c; `gates`
// (the forward's) is overwritten.
std::vector<at::Tensor> lstm_layer_backward(const at::Tensor& grad_out, const at::Tensor& grad_h,
                                            const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& h0,
                                            const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                            const at::Tensor& out, at::Tensor& gates, const at::Tensor& cells) {
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, {&grad_h, "grad_h"}, {&grad_c, "grad_c"}, {&x, "x"},
                         {&gates, "gates"}, {&cells, "cells"}})
    check(*t, name);
  const int64_t rows = x.size(0), steps = x.size(1), hidden = h0.size(1);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_h.sizes() == h0.sizes() && grad_c.sizes() == h0.sizes(),
              "lstm_layer: the gradients must be shaped like the outputs");
  auto dh = grad_h.clone();
  auto dc = grad_c.clone();
  const int64_t s4 = steps * 4 * hidden, sh = steps * hidden;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const float* c_prev = t == 0 ? c0.data_ptr<float>() : cells.data_ptr<float>() + (t - 1) * hidden;
    step_backward(grad_out.data_ptr<float>() + t * hidden, sh, dh.data_ptr<float>(),
                  gates.data_ptr<float>() + t * 4 * hidden, s4, cells.data_ptr<float>() + t * hidden, sh, c_prev,
                  t == 0 ? hidden : sh, dc.data_ptr<float>(), rows, hidden);
    dh = at::mm(gates.select(1, t), w_hh);
  }
  const auto d_flat = gates.view({rows * steps, 4 * hidden});
  const auto h_prev = at::cat({h0.unsqueeze(1), out.narrow(1, 0, steps - 1)}, 1);
  return {at::mm(d_flat, w_ih).view_as(x), dh, dc, at::mm(d_flat.t(), x.reshape({rows * steps, x.size(2)})),
          at::mm(d_flat.t(), h_prev.view({rows * steps, hidden})), d_flat.sum(0)};
}

}  // namespace vn30
