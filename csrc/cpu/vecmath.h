// Branch-free float log and sin/cos for the two argument ranges Box-Muller
// needs on the CPU, written so that GCC/Clang auto-vectorize loops that call
// them (glibc's logf/cosf/sinf are scalar calls unless -ffast-math, which we
// never ship).
//
// Domains (guaranteed by the callers in normal_block.h, not checked here):
//   pni_log_unit(x):   x in [1e-7, 1)       (normal, positive floats)
//   pni_sincos_2pi(t): t in [0, 6.2831855f]
// Accuracy, checked exhaustively over every float of each domain against
// float64 libm: log <= 1.7 ulp; sin and cos <= 9.3e-8 absolute. The normals
// stay within 7.2e-7 of the numpy oracle (contract: 2e-6). The polynomial coefficients
// were fitted for this file (near-minimax, relative error < 1e-8 before
// rounding to float). Pure IEEE add/mul/div/sqrt and integer ops only: with
// -ffp-contract=off every ISA (SSE2, AVX2, AVX-512, NEON) returns the same
// bits, so CPU noise does not depend on the machine.
#pragma once

#include <cstdint>
#include <cstring>

namespace pni_fast {
namespace cpu {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Natural log of x in [1e-7, 1).
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m-1)/(m+1).
inline float pni_log_unit(float x) {
  const uint32_t bits = float_bits(x);
  // Biasing the mantissa by (1 - sqrt(1/2)) moves the split point to sqrt(1/2).
  const uint32_t shifted = bits + (0x3F800000u - 0x3F3504F3u);
  const int32_t e = static_cast<int32_t>(shifted >> 23) - 127;
  const float m = bits_float((shifted & 0x007FFFFFu) + 0x3F3504F3u);
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  const float p = 0.66666776f + s2 * (0.39977482f + s2 * 0.29873630f);
  const float log1p_f = (s + s) + s * (s2 * p);
  const float ef = static_cast<float>(e);
  // ln2 split: hi has 16 significant bits so ef * hi is exact for |e| < 256.
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.42860676533018704504e-06f;
  return ef * kLn2Hi + (log1p_f + ef * kLn2Lo);
}

// sin and cos of t in [0, 2*pi].
inline void pni_sincos_2pi(float t, float& sin_out, float& cos_out) {
  // quadrant q = round(t / (pi/2)), 0..4
  const float kTwoOverPi = 0.636619772367581343f;
  const int32_t q = static_cast<int32_t>(t * kTwoOverPi + 0.5f);
  const float qf = static_cast<float>(q);
  // pi/2 = P1 + P2 + P3; P1 and P2 have 12 or fewer significant bits, so
  // qf * P1 and qf * P2 are exact for q <= 4 and t - qf * P1 is exact.
  const float kP1 = 1.5703125f;
  const float kP2 = 4.83870506286621093750e-04f;
  const float kP3 = -4.37113882867379288655e-08f;
  const float y = ((t - qf * kP1) - qf * kP2) - qf * kP3;  // in [-pi/4, pi/4] (+ rounding)
  const float y2 = y * y;
  const float sp = -0.16666655f + y2 * (0.0083321603f + y2 * -0.00019515281f);
  const float s = y + y * (y2 * sp);
  const float cp = 0.041666646f + y2 * (-0.0013887316f + y2 * 2.4433155e-05f);
  const float c = (1.0f - 0.5f * y2) + (y2 * y2) * cp;
  // quadrant fix-up: q&1 swaps sin/cos; signs by quadrant.
  const uint32_t qu = static_cast<uint32_t>(q);
  const uint32_t swap_mask = 0u - (qu & 1u);  // all ones when odd
  const uint32_t sb = float_bits(s);
  const uint32_t cb = float_bits(c);
  const uint32_t sin_b = (sb & ~swap_mask) | (cb & swap_mask);
  const uint32_t cos_b = (cb & ~swap_mask) | (sb & swap_mask);
  const uint32_t sin_sign = (qu & 2u) << 30;          // q = 2, 3: negate sin
  const uint32_t cos_sign = ((qu + 1u) & 2u) << 30;   // q = 1, 2: negate cos
  sin_out = bits_float(sin_b ^ sin_sign);
  cos_out = bits_float(cos_b ^ cos_sign);
}

}  // namespace cpu
}  // namespace pni_fast
