// The functions the CPU kernels export to Python (bindings.cpp): one source file per kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace vn30 {

// variable_mix.cpp: the TFT variable selection's numeric embedding, per-variable GRNs and weighted mix
at::Tensor variable_mix_forward(const at::Tensor& values, const at::Tensor& weights, const at::Tensor& ew,
                                const at::Tensor& eb, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& wg,
                                const at::Tensor& bg, const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                int64_t dropout_seed, int64_t dropout_threshold);
std::vector<at::Tensor> variable_mix_backward(const at::Tensor& grad_out, const at::Tensor& values,
                                              const at::Tensor& weights, const at::Tensor& ew, const at::Tensor& eb,
                                              const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                              const at::Tensor& b2, const at::Tensor& wg, const at::Tensor& bg,
                                              const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                              int64_t dropout_seed, int64_t dropout_threshold);
at::Tensor variable_mix_dropout_mask(int64_t rows, int64_t n_vars, int64_t hidden, int64_t dropout_seed,
                                     int64_t dropout_threshold);

// numeric_embedding.cpp: x[n, v] * w[v, :] + b[v, :] and its gradients (x, w, b)
at::Tensor numeric_embedding_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
std::vector<at::Tensor> numeric_embedding_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w);

// glu.cpp: residual + (a + ca) * sigmoid(b + cb) for x = [a, b] and bias c = [ca, cb] along the last dimension,
// and its gradient of x (that of c is its sum over the rows; that of the residual, the output's)
at::Tensor glu_forward(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual);
at::Tensor glu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias);

// elu.cpp: ELU(x) and its gradient from the output
at::Tensor elu_forward(const at::Tensor& x);
at::Tensor elu_backward(const at::Tensor& grad, const at::Tensor& out);

// lstm_layer.cpp: one batch-first LSTM layer (torch's gate order i, f, g, o); the forward returns the output sequence,
// the final h and c, and the activated gates and cell states its backward takes (and overwrites: the gates)
std::vector<at::Tensor> lstm_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                           const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias);
std::vector<at::Tensor> lstm_layer_backward(const at::Tensor& grad_out, const at::Tensor& grad_h,
                                            const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& h0,
                                            const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                            const at::Tensor& out, at::Tensor& gates, const at::Tensor& cells);

// dropout.cpp: x times a hashed dropout mask (forward and backward alike)
at::Tensor dropout(const at::Tensor& x, int64_t dropout_seed, int64_t dropout_threshold);

}  // namespace vn30
