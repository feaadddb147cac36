// See normal_block.h. Compiled with -ffp-contract=off (setup.py) so the
// SIMD variants below agree bit-for-bit.
#include "normal_block.h"

#include <cmath>

#include "../philox.h"
#include "vecmath.h"

// Run-time SIMD dispatch without -march flags: GCC emits one clone per target
// and an ifunc resolver picks one when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(PNI_FAST_NO_CLONES)
#define PNI_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PNI_SIMD_CLONES
#endif

namespace pni_fast {
namespace cpu {

PNI_SIMD_CLONES
void normal_block(uint64_t seed, uint64_t ctr0, float* __restrict__ z) {
  alignas(64) uint32_t c0[kBlockQuads], c1[kBlockQuads], c2[kBlockQuads], c3[kBlockQuads];
  const uint32_t lo0 = static_cast<uint32_t>(ctr0);
  const uint32_t hi0 = static_cast<uint32_t>(ctr0 >> 32);
  for (int j = 0; j < kBlockQuads; ++j) {
    // 64-bit counter ctr0 + j split into words without 64-bit lanes.
    const uint32_t lo = lo0 + static_cast<uint32_t>(j);
    c0[j] = lo;
    c1[j] = hi0 + (lo < lo0 ? 1u : 0u);
    c2[j] = 0u;
    c3[j] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int j = 0; j < kBlockQuads; ++j) {
      philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Pair p < 64 is (w0, w1) of counter p; pair p >= 64 is (w2, w3) of counter p - 64.
  constexpr int kPairs = 2 * kBlockQuads;
  alignas(64) float u1[kPairs], u2[kPairs];
  for (int j = 0; j < kBlockQuads; ++j) {
    const float a = uniform_from_word(c0[j]);
    const float b = uniform_from_word(c2[j]);
    u1[j] = a > kMinUniform ? a : kMinUniform;
    u1[kBlockQuads + j] = b > kMinUniform ? b : kMinUniform;
    u2[j] = uniform_from_word(c1[j]);
    u2[kBlockQuads + j] = uniform_from_word(c3[j]);
  }
  alignas(64) float rad[kPairs], sn[kPairs], cs[kPairs];
  for (int p = 0; p < kPairs; ++p) {
    rad[p] = std::sqrt(-2.0f * pni_log_unit(u1[p]));
  }
  for (int p = 0; p < kPairs; ++p) {
    pni_sincos_2pi(kTwoPi * u2[p], sn[p], cs[p]);
  }
  for (int j = 0; j < kBlockQuads; ++j) {
    z[4 * j + 0] = rad[j] * cs[j];
    z[4 * j + 1] = rad[j] * sn[j];
    z[4 * j + 2] = rad[kBlockQuads + j] * cs[kBlockQuads + j];
    z[4 * j + 3] = rad[kBlockQuads + j] * sn[kBlockQuads + j];
  }
}

}  // namespace cpu
}  // namespace pni_fast
