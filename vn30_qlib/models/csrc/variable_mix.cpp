// The TFT variable selection's numeric embedding, per-variable GRNs and weighted mix in one pass over the rows
// (CPU, float32).
//
// For row r and variable v, with e = x[r, v] * E[v] + c[v] (the variable's embedding, D values) and one GRN per
// variable:
//   z1 = e W1[v] + b1[v];  h1 = elu(z1);  z2 = dropout(h1 W2[v] + b2[v]);  g = z2 Wg[v] + bg[v]
//   y  = LayerNorm(e + g[:D] * sigmoid(g[D:]))          (one norm, gamma and beta, shared by the variables)
//   out[r] = sum_v weights[r, v] * y
// Torch runs this as ~20 kernels over (rows, V, D) tensors whose last dimension is 8: memory traffic and
// poorly vectorised loops. Here rows are taken kLanes at a time and every value is a vector over those rows,
// so each step is one vertical vector operation (the norm's sums too) and every intermediate stays in cache.
// The backward recomputes the forward from its inputs, so nothing but the inputs is kept between the two, and
// reading one value per row and variable instead of its D-wide embedding keeps the row transposes short.
// The dropout mask is a hash of each value's position and a seed, made where it is used (never stored): the
// same mask whatever the tiling or thread count, and the backward remakes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace vn30 {
namespace {

inline float sum_lanes(vf x) {
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += x[l];
  return total;
}

// Rows l = 0 .. n-1 of a row-major float array (row l at src + l * stride), W values each, as W vectors over the
// rows (lanes past n are zero). Written value by value into a plain array, then read as vectors: inserting
// values into vector lanes one at a time was the kernel's slowest part.
template <int W>
inline void gather_rows(const float* src, int64_t stride, int n, vf (&out)[W]) {
  float lanes[W][kLanes] = {};
  for (int l = 0; l < n; ++l)
    for (int i = 0; i < W; ++i) lanes[i][l] = src[l * stride + i];
  std::memcpy(out, lanes, sizeof lanes);
}

// The inverse of gather_rows: lanes 0 .. n-1 of W vectors written as n rows of W values.
template <int W>
inline void scatter_rows(const vf (&in)[W], float* dst, int64_t stride, int n) {
  float lanes[W][kLanes];
  std::memcpy(lanes, in, sizeof lanes);
  for (int l = 0; l < n; ++l)
    for (int i = 0; i < W; ++i) dst[l * stride + i] = lanes[i][l];
}

// One variable's parameters: embedding E, c (D); W1 (D, H), b1 (H), W2 (H, H), b2 (H), Wg (H, 2D), bg (2D);
// gamma, beta (D) shared.
struct Params {
  const float *ew, *eb, *w1, *b1, *w2, *b2, *wg, *bg, *gamma, *beta;
};

// kLanes rows of one variable: every value is a vector over the rows.
template <int D, int H>
struct Tile {
  vf x[1], e[D], m[H], w[1];
  vf z1[H], h1[H], z2[H], g[2 * D], sig[D], shat[D], rstd, y[D];
  bool masked;

  // rows r0 .. r0 + n - 1 (n <= kLanes); the lanes past n hold zeros
  void load(const float* values, const float* weights, const Params& p, const DropoutMask& dropout, int64_t r0, int n,
            int n_vars, int v) {
    gather_rows(weights + r0 * n_vars + v, n_vars, n, w);
    gather_rows(values + r0 * n_vars + v, n_vars, n, x);
    for (int i = 0; i < D; ++i) e[i] = x[0] * p.ew[i] + p.eb[i];
    masked = dropout.active();
    if (masked) {
      vu index;
      for (int l = 0; l < kLanes; ++l) index[l] = (uint32_t)(((r0 + l) * n_vars + v) * H);
      for (int k = 0; k < H; ++k) m[k] = dropout.at(index + (uint32_t)k);
    }
  }

  template <int IN, int OUT>
  static void affine(const vf (&x)[IN], const float* weight, const float* bias, vf (&out)[OUT]) {
    for (int o = 0; o < OUT; ++o) out[o] = vf{} + bias[o];
    for (int i = 0; i < IN; ++i)
      for (int o = 0; o < OUT; ++o) out[o] += x[i] * weight[i * OUT + o];
  }

  void forward(const Params& p, float eps) {
    affine<D, H>(e, p.w1, p.b1, z1);
    for (int j = 0; j < H; ++j) h1[j] = z1[j] > 0.f ? z1[j] : fast_exp(z1[j] < 0.f ? z1[j] : 0.f) - 1.f;
    affine<H, H>(h1, p.w2, p.b2, z2);
    if (masked)
      for (int k = 0; k < H; ++k) z2[k] *= m[k];
    affine<H, 2 * D>(z2, p.wg, p.bg, g);
    vf mean = vf{}, var = vf{};
    for (int i = 0; i < D; ++i) {
      sig[i] = 1.f / (1.f + fast_exp(-g[D + i]));
      shat[i] = e[i] + g[i] * sig[i];
      mean += shat[i];
    }
    mean *= 1.f / D;
    for (int i = 0; i < D; ++i) {
      shat[i] -= mean;
      var += shat[i] * shat[i];
    }
    vf root;
    var = var * (1.f / D) + eps;
    for (int l = 0; l < kLanes; ++l) root[l] = std::sqrt(var[l]);
    rstd = 1.f / root;
    for (int i = 0; i < D; ++i) {
      shat[i] *= rstd;
      y[i] = shat[i] * p.gamma[i] + p.beta[i];
    }
  }
};

Params params_of(const at::Tensor& ew, const at::Tensor& eb, const at::Tensor& w1, const at::Tensor& b1,
                 const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& wg, const at::Tensor& bg,
                 const at::Tensor& gamma, const at::Tensor& beta) {
  for (const auto* t : {&ew, &eb, &w1, &b1, &w2, &b2, &wg, &bg, &gamma, &beta}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "variable_mix: parameters must be contiguous float32 CPU tensors");
  }
  return {ew.data_ptr<float>(), eb.data_ptr<float>(), w1.data_ptr<float>(), b1.data_ptr<float>(),
          w2.data_ptr<float>(), b2.data_ptr<float>(), wg.data_ptr<float>(), bg.data_ptr<float>(),
          gamma.data_ptr<float>(), beta.data_ptr<float>()};
}

Params of_variable(const Params& p, int v, int D, int H) {
  return {p.ew + v * D, p.eb + v * D, p.w1 + v * D * H, p.b1 + v * H, p.w2 + v * H * H, p.b2 + v * H,
          p.wg + v * H * 2 * D, p.bg + v * 2 * D, p.gamma, p.beta};
}

template <int D, int H>
void forward_rows(const float* values, const float* weights, const DropoutMask& dropout, const Params& p,
                  float* out, int64_t rows, int n_vars, float eps) {
  const int64_t n_tiles = (rows + kLanes - 1) / kLanes;
  at::parallel_for(0, n_tiles, 4, [&](int64_t begin, int64_t end) {
    Tile<D, H> tile;
    vf mix[D];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kLanes;
      const int n = (int)std::min<int64_t>(kLanes, rows - r0);
      for (int i = 0; i < D; ++i) mix[i] = vf{};
      for (int v = 0; v < n_vars; ++v) {
        const Params pv = of_variable(p, v, D, H);
        tile.load(values, weights, pv, dropout, r0, n, n_vars, v);
        tile.forward(pv, eps);
        for (int i = 0; i < D; ++i) mix[i] += tile.w[0] * tile.y[i];
      }
      scatter_rows(mix, out + r0 * D, D, n);
    }
  });
}

// Output gradients of one variable's parameters, and their per-lane sums while its rows are walked.
struct ParamGrads {
  float *ew, *eb, *w1, *b1, *w2, *b2, *wg, *bg, *gamma, *beta;
};

template <int D, int H>
struct LaneSums {
  vf ew[D], eb[D], w1[D * H], b1[H], w2[H * H], b2[H], wg[H * 2 * D], bg[2 * D], gamma[D], beta[D];

  template <int N>
  static void write(const vf (&acc)[N], float* out) {
    for (int o = 0; o < N; ++o) out[o] = sum_lanes(acc[o]);
  }

  void write(const ParamGrads& g) const {
    write(ew, g.ew), write(eb, g.eb), write(w1, g.w1), write(b1, g.b1), write(w2, g.w2), write(b2, g.b2);
    write(wg, g.wg), write(bg, g.bg), write(gamma, g.gamma), write(beta, g.beta);
  }
};

// One variable per task, so each task owns that variable's parameter gradients (no atomics, and the sums run
// in one fixed order whatever the thread count: the result is deterministic). gamma and beta get one row per
// variable, summed by the caller.
template <int D, int H>
void backward_vars(const float* grad_out, const float* values, const float* weights, const DropoutMask& dropout,
                   const Params& p, float* g_values, float* g_weights, const ParamGrads& grads, int64_t rows,
                   int n_vars, float eps) {
  at::parallel_for(0, n_vars, 1, [&](int64_t v_begin, int64_t v_end) {
    Tile<D, H> c;
    auto acc = std::make_unique<LaneSums<D, H>>();
    vf go[D], dy[D], ds[D], dg[2 * D], dz2[H], dz1[H];
    for (int64_t v = v_begin; v < v_end; ++v) {
      const Params pv = of_variable(p, (int)v, D, H);
      *acc = LaneSums<D, H>{};
      for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
        const int n = (int)std::min<int64_t>(kLanes, rows - r0);
        c.load(values, weights, pv, dropout, r0, n, n_vars, (int)v);
        c.forward(pv, eps);
        gather_rows(grad_out + r0 * D, D, n, go);
        // the mix out = sum_v w_v y_v, then the norm
        vf gw[1] = {}, mean_dyh = vf{}, mean_dyh_shat = vf{};
        for (int i = 0; i < D; ++i) {
          gw[0] += go[i] * c.y[i];
          dy[i] = c.w[0] * go[i];
          acc->gamma[i] += dy[i] * c.shat[i];
          acc->beta[i] += dy[i];
          mean_dyh += dy[i] * pv.gamma[i];
          mean_dyh_shat += dy[i] * pv.gamma[i] * c.shat[i];
        }
        scatter_rows(gw, g_weights + r0 * n_vars + v, n_vars, n);
        mean_dyh *= 1.f / D;
        mean_dyh_shat *= 1.f / D;
        // the norm's input is e + GLU(g): ds goes to both (the skip connection and the gate)
        for (int i = 0; i < D; ++i) {
          ds[i] = c.rstd * (dy[i] * pv.gamma[i] - mean_dyh - c.shat[i] * mean_dyh_shat);
          dg[i] = ds[i] * c.sig[i];
          dg[D + i] = ds[i] * c.g[i] * c.sig[i] * (1.f - c.sig[i]);
        }
        // gate map z2 -> g
        for (int o = 0; o < 2 * D; ++o) acc->bg[o] += dg[o];
        for (int k = 0; k < H; ++k) {
          dz2[k] = vf{};
          for (int o = 0; o < 2 * D; ++o) {
            acc->wg[k * 2 * D + o] += c.z2[k] * dg[o];
            dz2[k] += dg[o] * pv.wg[k * 2 * D + o];
          }
          if (c.masked) dz2[k] *= c.m[k];
          acc->b2[k] += dz2[k];
        }
        // hidden map h1 -> z2, then the ELU: elu'(z) = exp(z) = elu(z) + 1 below 0
        for (int j = 0; j < H; ++j) {
          vf dh1 = vf{};
          for (int k = 0; k < H; ++k) {
            acc->w2[j * H + k] += c.h1[j] * dz2[k];
            dh1 += dz2[k] * pv.w2[j * H + k];
          }
          dz1[j] = c.z1[j] > 0.f ? dh1 : dh1 * (c.h1[j] + 1.f);
          acc->b1[j] += dz1[j];
        }
        // input map e -> z1 (de also takes ds: the skip connection), then the embedding e = x E + c
        vf dx[1] = {};
        for (int i = 0; i < D; ++i) {
          vf de = ds[i];
          for (int j = 0; j < H; ++j) {
            acc->w1[i * H + j] += c.e[i] * dz1[j];
            de += dz1[j] * pv.w1[i * H + j];
          }
          acc->ew[i] += de * c.x[0];
          acc->eb[i] += de;
          dx[0] += de * pv.ew[i];
        }
        scatter_rows(dx, g_values + r0 * n_vars + v, n_vars, n);
      }
      acc->write({grads.ew + v * D, grads.eb + v * D, grads.w1 + v * D * H, grads.b1 + v * H,
                  grads.w2 + v * H * H, grads.b2 + v * H, grads.wg + v * H * 2 * D, grads.bg + v * 2 * D,
                  grads.gamma + v * D, grads.beta + v * D});
    }
  });
}

void check_inputs(const at::Tensor& values, const at::Tensor& weights, const at::Tensor& ew, const at::Tensor& w1) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.scalar_type() == at::kFloat &&
                  values.device().is_cpu(),
              "variable_mix: values must be a contiguous float32 CPU tensor (rows, variables)");
  TORCH_CHECK(weights.sizes() == values.sizes() && weights.is_contiguous() && weights.scalar_type() == at::kFloat,
              "variable_mix: weights must be contiguous float32 (rows, variables)");
  TORCH_CHECK(ew.dim() == 2 && ew.size(0) == values.size(1), "variable_mix: the embedding must be (variables, width)");
  TORCH_CHECK(w1.dim() == 3 && w1.size(0) == values.size(1) && w1.size(1) == ew.size(1),
              "variable_mix: W1 must be (variables, width, hidden)");
  TORCH_CHECK(ew.size(1) == 8 && w1.size(2) == 8, "variable_mix: only width 8 and hidden 8 are compiled");
}

}  // namespace

// (rows, width): the weighted mix. dropout_threshold 0: no dropout (evaluation).
at::Tensor variable_mix_forward(const at::Tensor& values, const at::Tensor& weights, const at::Tensor& ew,
                                const at::Tensor& eb, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& wg,
                                const at::Tensor& bg, const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                int64_t dropout_seed, int64_t dropout_threshold) {
  check_inputs(values, weights, ew, w1);
  const auto p = params_of(ew, eb, w1, b1, w2, b2, wg, bg, gamma, beta);
  auto out = at::empty({values.size(0), ew.size(1)}, values.options());
  forward_rows<8, 8>(values.data_ptr<float>(), weights.data_ptr<float>(),
                     DropoutMask(dropout_seed, dropout_threshold), p, out.data_ptr<float>(), values.size(0),
                     (int)values.size(1), (float)eps);
  return out;
}

// The gradients of values, weights and the twelve parameters, for the gradient of the mix.
std::vector<at::Tensor> variable_mix_backward(const at::Tensor& grad_out, const at::Tensor& values,
                                              const at::Tensor& weights, const at::Tensor& ew, const at::Tensor& eb,
                                              const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                              const at::Tensor& b2, const at::Tensor& wg, const at::Tensor& bg,
                                              const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                              int64_t dropout_seed, int64_t dropout_threshold) {
  check_inputs(values, weights, ew, w1);
  const int n_vars = (int)values.size(1), d = (int)ew.size(1);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == at::IntArrayRef({values.size(0), d}),
              "variable_mix: grad_out must be contiguous (rows, width)");
  const auto p = params_of(ew, eb, w1, b1, w2, b2, wg, bg, gamma, beta);
  auto g_values = at::empty_like(values), g_weights = at::empty_like(weights);
  auto g_ew = at::empty_like(ew), g_eb = at::empty_like(eb);
  auto g_w1 = at::empty_like(w1), g_b1 = at::empty_like(b1), g_w2 = at::empty_like(w2);
  auto g_b2 = at::empty_like(b2), g_wg = at::empty_like(wg), g_bg = at::empty_like(bg);
  auto g_gamma_v = at::empty({n_vars, d}, ew.options()), g_beta_v = at::empty({n_vars, d}, ew.options());
  const ParamGrads grads{g_ew.data_ptr<float>(), g_eb.data_ptr<float>(), g_w1.data_ptr<float>(),
                         g_b1.data_ptr<float>(), g_w2.data_ptr<float>(), g_b2.data_ptr<float>(),
                         g_wg.data_ptr<float>(), g_bg.data_ptr<float>(), g_gamma_v.data_ptr<float>(),
                         g_beta_v.data_ptr<float>()};
  backward_vars<8, 8>(grad_out.data_ptr<float>(), values.data_ptr<float>(), weights.data_ptr<float>(),
                      DropoutMask(dropout_seed, dropout_threshold), p, g_values.data_ptr<float>(),
                      g_weights.data_ptr<float>(), grads, values.size(0), n_vars, (float)eps);
  // the norm's parameters are shared by the variables: their per-variable sums are added in a fixed order
  return {g_values, g_weights, g_ew, g_eb, g_w1, g_b1, g_w2, g_b2, g_wg, g_bg, g_gamma_v.sum(0), g_beta_v.sum(0)};
}

// The dropout mask forward and backward apply, as a (rows, variables, hidden) tensor: for tests.
at::Tensor variable_mix_dropout_mask(int64_t rows, int64_t n_vars, int64_t hidden, int64_t dropout_seed,
                                     int64_t dropout_threshold) {
  TORCH_CHECK(hidden == 8, "variable_mix: only hidden 8 is compiled");
  auto mask = at::empty({rows, n_vars, hidden}, at::kFloat);
  const DropoutMask dropout(dropout_seed, dropout_threshold);
  float* out = mask.data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes)
    for (int64_t v = 0; v < n_vars; ++v) {
      vu index;
      for (int l = 0; l < kLanes; ++l) index[l] = (uint32_t)(((r0 + l) * n_vars + v) * hidden);
      for (int k = 0; k < hidden; ++k) {
        const vf m = dropout.at(index + (uint32_t)k);
        for (int l = 0; l < kLanes && r0 + l < rows; ++l) out[((r0 + l) * n_vars + v) * hidden + k] = m[l];
      }
    }
  return mask;
}

}  // namespace vn30
