// Shared by the CPU kernels: float and integer vectors of kLanes values, their loads and stores, a vector exp,
// and the hashed dropout mask.
#pragma once

#include <cstdint>
#include <cstring>

namespace vn30 {

constexpr int kLanes = 16;  // rows per tile: one AVX-512 register of floats, two AVX2 ones
// a value of kLanes rows (GCC/Clang vector extension: vertical arithmetic, compiled to the CPU's SIMD width)
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// count (<= kLanes) consecutive floats as a vector, the rest zero; a whole vector as one load, not a memcpy call
// of a runtime size (which the compiler leaves as a call)
inline vf load_lanes(const float* src, int count) {
  vf v = {};
  if (count == kLanes)
    std::memcpy(&v, src, sizeof v);
  else
    std::memcpy(&v, src, count * sizeof(float));
  return v;
}

// the first count lanes of v written to dst
inline void store_lanes(vf v, float* dst, int count) {
  if (count == kLanes)
    std::memcpy(dst, &v, sizeof v);
  else
    std::memcpy(dst, &v, count * sizeof(float));
}

// exp(x) to about 2e-7 relative error in vector arithmetic (x = n ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor
// polynomial for exp(r), 2^n written into the exponent bits): libm's expf is one scalar call per value.
inline vf fast_exp(vf x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const vf n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest: 12582912 = 1.5 * 2^23
  const vf r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  const vf p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<const vf&>(bits);
}

// lowbias32 (Chris Wellons' integer hash): each output bit flips with about half of the input bits
inline vu hash32(vu x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Inverted dropout whose mask is made, never stored: the value at position i (each kernel says how it numbers its
// values) is kept, scaled by `scale`, when the top 16 bits of the hash of i and the seed are at least `threshold`
// (= round(p * 65536); 0: no dropout). The same mask whatever the tiling or thread count; a backward remakes it.
struct DropoutMask {
  uint32_t seed_lo, seed_hi, threshold;
  float scale;

  DropoutMask(int64_t seed, int64_t threshold_)
      : seed_lo((uint32_t)seed), seed_hi((uint32_t)((uint64_t)seed >> 32)), threshold((uint32_t)threshold_),
        scale(65536.f / (65536.f - (float)threshold_)) {}

  bool active() const { return threshold > 0; }

  vf at(vu index) const {
    const vu bits = hash32(hash32(index ^ seed_lo) + seed_hi) >> 16;
    return bits >= threshold ? vf{} + scale : vf{};
  }
};

}  // namespace vn30
