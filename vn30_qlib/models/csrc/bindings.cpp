// The Python module of the CPU kernels (built by vn30_qlib/models/cpu_kernels.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("variable_mix_forward", &vn30::variable_mix_forward, "the variable selection's GRNs and weighted mix");
  m.def("variable_mix_backward", &vn30::variable_mix_backward, "their gradients");
  m.def("variable_mix_dropout_mask", &vn30::variable_mix_dropout_mask, "the mix's dropout mask, for tests");
  m.def("numeric_embedding_forward", &vn30::numeric_embedding_forward, "x[n, v] * w[v, :] + b[v, :]");
  m.def("numeric_embedding_backward", &vn30::numeric_embedding_backward, "its gradients of x, w and b");
  m.def("glu_forward", &vn30::glu_forward, "residual + (a + ca) * sigmoid(b + cb), x = [a, b], bias = [ca, cb]");
  m.def("glu_backward", &vn30::glu_backward, "its gradient of x");
  m.def("elu_forward", &vn30::elu_forward, "ELU(x)");
  m.def("elu_backward", &vn30::elu_backward, "its gradient, from the output");
  m.def("lstm_layer_forward", &vn30::lstm_layer_forward, "one batch-first LSTM layer");
  m.def("lstm_layer_backward", &vn30::lstm_layer_backward, "its gradients of x, h0, c0, w_ih, w_hh and the bias");
  m.def("dropout", &vn30::dropout, "x times the hashed dropout mask of a seed and threshold");
}
