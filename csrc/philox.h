// Shared random-number core of pni_fast (design.md section 3).
//
// Every C++ kernel (CPU and CUDA) draws its noise through these functions so
// that a given (seed, counter) yields bit-identical Philox words and uniforms
// on every device, and normals that differ only by the last-ulp behaviour of
// the platform's accurate logf/cosf/sinf.
//
//   * Philox4x32-10 (Random123): key k0 = seed & 0xFFFFFFFF, k1 = seed >> 32;
//     counter c0 = ctr & 0xFFFFFFFF, c1 = ctr >> 32, c2 = c3 = 0.
//   * uniform(x): v = int32(x); v = v < 0 ? ~v : v; float(v) * 4.6566127342e-10f
//     (the same mapping as Triton's uint_to_uniform_float).
//   * Box-Muller on the pairs (w0, w1) and (w2, w3), like Triton's randn4x.
//
// Only accurate libm calls are used: never compile a file that includes this
// header with --use_fast_math / -ffast-math, or the normals drift from the
// other backends.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PNI_HD __host__ __device__ __forceinline__
#else
#define PNI_HD inline
#endif

namespace pni_fast {

// Philox4x32 round constants (Random123).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump for k0
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump for k1
constexpr int kPhiloxRounds = 10;
// 0x2FFFFFFF as fp32: maps [0, 2^31) into [0, 1).
constexpr float kUniformScale = 4.6566127342e-10f;
// fp32 value of 2*pi used by Triton's pair_uniform_to_normal.
constexpr float kTwoPi = 6.2831855f;
constexpr float kMinUniform = 1e-7f;

// Four output words of one Philox call.
struct PhiloxQuad {
  uint32_t w[4];
};

// Four standard normals of one Philox call, in element order.
struct NormalQuad {
  float z[4];
};

// One Philox round on (c0..c3) with key (k0, k1). The 32x32->64 product is
// computed as a uint64 multiply so host and device give the same bits.
// The same bits either way; on the device __umulhi + a 32-bit multiply become one IMAD.WIDE.U32
// (the uint64 product costs an extra add of a zero high word per multiply).
PNI_HD void mul_hilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

PNI_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                         uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mul_hilo(kPhiloxM0, c0, hi0, lo0);
  mul_hilo(kPhiloxM1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Philox4x32-10 of a full 128-bit counter (c0..c3) under key (k0, k1);
// exposed so Random123's known-answer vectors can pin the core.
PNI_HD PhiloxQuad philox4x32_10_full(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  PhiloxQuad q;
  q.w[0] = c0;
  q.w[1] = c1;
  q.w[2] = c2;
  q.w[3] = c3;
  return q;
}

// Philox4x32-10 of the 64-bit counter `ctr` under the 64-bit `seed`
// (design.md: c0 = ctr low word, c1 = ctr high word, c2 = c3 = 0).
PNI_HD PhiloxQuad philox4x32_10(uint64_t ctr, uint64_t seed) {
  return philox4x32_10_full(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u,
                            static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform float in [0, 1) from one Philox word (before the 1e-7 clamp).
PNI_HD float uniform_from_word(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * kUniformScale;
}

// Box-Muller on the uniforms (u1, u2): writes (r cos t, r sin t).
PNI_HD void box_muller(float u1, float u2, float& za, float& zb) {
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float r = sqrtf(-2.0f * logf(u1));
  const float t = kTwoPi * u2;
#if defined(__CUDA_ARCH__)
  // One range reduction for both: CUDA's accurate sincosf runs the reduction of sinf/cosf once
  // and both of their polynomials, so the bits are those of sinf(t) and cosf(t).
  float s, c;
  sincosf(t, &s, &c);
  za = r * c;
  zb = r * s;
#else
  za = r * cosf(t);
  zb = r * sinf(t);
#endif
}

// Four normals (elements 4j..4j+3) from one Philox quad.
PNI_HD NormalQuad box_muller4(const PhiloxQuad& q) {
  NormalQuad n;
  box_muller(uniform_from_word(q.w[0]), uniform_from_word(q.w[1]), n.z[0], n.z[1]);
  box_muller(uniform_from_word(q.w[2]), uniform_from_word(q.w[3]), n.z[2], n.z[3]);
  return n;
}

// Convenience: the four normals of counter `ctr` under `seed`.
PNI_HD NormalQuad normal4(uint64_t ctr, uint64_t seed) {
  return box_muller4(philox4x32_10(ctr, seed));
}

}  // namespace pni_fast
