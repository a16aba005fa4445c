// Inverted dropout with a hashed mask (simd.h's DropoutMask), numbered by each value's flat position: nothing is
// stored, the backward applies the same function to the gradient, and a mask costs a few integer vector
// operations per kLanes values instead of torch's CPU bernoulli_ (about 16 ns a value).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"
#include "simd.h"

namespace vn30 {
namespace {

template <typename T>
void masked_copy(const T* src, T* dst, int64_t n, const DropoutMask& mask) {
  vu lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = (uint32_t)l;
  at::parallel_for(0, (n + kLanes - 1) / kLanes, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = t * kLanes;
      const vf m = mask.at(lane + (uint32_t)i0);
      const int count = (int)std::min<int64_t>(kLanes, n - i0);
      if constexpr (std::is_same_v<T, float>)
        store_lanes(load_lanes(src + i0, count) * m, dst + i0, count);
      else
        for (int l = 0; l < count; ++l) dst[i0 + l] = static_cast<T>(static_cast<float>(src[i0 + l]) * m[l]);
    }
  });
}

}  // namespace

at::Tensor dropout(const at::Tensor& x, int64_t dropout_seed, int64_t dropout_threshold) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "dropout: x must be a contiguous CPU tensor");
  TORCH_CHECK(x.numel() <= (int64_t(1) << 32), "dropout: at most 2^32 values (the mask hashes 32-bit positions)");
  const DropoutMask mask(dropout_seed, dropout_threshold);
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    masked_copy(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), mask);
  } else if (x.scalar_type() == at::kBFloat16) {
    masked_copy(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), x.numel(), mask);
  } else {
    TORCH_CHECK(false, "dropout: float32 or bfloat16 tensors only, got ", x.scalar_type());
  }
  return out;
}

}  // namespace vn30
