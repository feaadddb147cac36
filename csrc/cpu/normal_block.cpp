// See normal_block.h.
//
// Three builds of the same block generator, picked once at run time from the
// CPU's features (no -march flag: the library runs on any x86-64 / ARM CPU):
//   * avx512: Philox with AVX-512 intrinsics, math loops auto-vectorized for AVX-512
//   * avx2:   Philox with AVX2 intrinsics, math loops auto-vectorized for AVX2
//   * generic: plain loops (SSE2 / NEON auto-vectorization)
// The compiler turns the 32x32->64 Philox products of the plain loops into slow
// 64-bit lane multiplies, hence the intrinsics; the rest is portable C++.
// Compiled with -ffp-contract=off (setup.py), and all steps are exact IEEE
// operations, so every variant returns the same bits. The environment variable
// PNI_FAST_CPU_ISA=auto|generic|avx2|avx512 forces a variant (for tests); any other
// value, or a variant this CPU lacks, makes every CPU op raise an error.
#include "normal_block.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../philox.h"
#include "isa.h"
#include "vecmath.h"

namespace pni_fast {
namespace cpu {
namespace {

constexpr int kPairs = 2 * kBlockQuads;

// Counter words of ctr0 + j (c0 = low word, c1 = high word, carry included).
PNI_ALWAYS_INLINE void init_counters(uint64_t ctr0, uint32_t* c0, uint32_t* c1) {
  const uint32_t lo0 = static_cast<uint32_t>(ctr0);
  const uint32_t hi0 = static_cast<uint32_t>(ctr0 >> 32);
  for (int j = 0; j < kBlockQuads; ++j) {
    const uint32_t lo = lo0 + static_cast<uint32_t>(j);
    c0[j] = lo;
    c1[j] = hi0 + (lo < lo0 ? 1u : 0u);
  }
}

// Philox on lane arrays with plain code (round outermost, lanes innermost).
PNI_ALWAYS_INLINE void philox_block_plain(uint64_t seed, uint64_t ctr0, uint32_t* c0, uint32_t* c1, uint32_t* c2,
                                          uint32_t* c3) {
  init_counters(ctr0, c0, c1);
  for (int j = 0; j < kBlockQuads; ++j) {
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
}

// Words -> uniforms -> Box-Muller -> element order. Plain loops, vectorized
// for whatever target the caller is compiled for.
PNI_ALWAYS_INLINE void box_muller_block(const uint32_t* c0, const uint32_t* c1, const uint32_t* c2,
                                        const uint32_t* c3, float* PNI_RESTRICT z) {
  // pair p < 64 is (w0, w1) of counter p; pair p >= 64 is (w2, w3) of counter p - 64
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

void normal_block_generic(uint64_t seed, uint64_t ctr0, float* z) {
  alignas(64) uint32_t c0[kBlockQuads], c1[kBlockQuads], c2[kBlockQuads], c3[kBlockQuads];
  philox_block_plain(seed, ctr0, c0, c1, c2, c3);
  box_muller_block(c0, c1, c2, c3, z);
}

#if PNI_X86_DISPATCH

// ---- AVX2: 8 lanes per vector, 8 vectors per block ----

PNI_TARGET_AVX2 PNI_ALWAYS_INLINE void mul_hilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0,2,..: 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,..
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

PNI_TARGET_AVX2 void normal_block_avx2(uint64_t seed, uint64_t ctr0, float* z) {
  alignas(64) uint32_t c0[kBlockQuads], c1[kBlockQuads], c2[kBlockQuads], c3[kBlockQuads];
  init_counters(ctr0, c0, c1);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  constexpr int kVec = 8;
  constexpr int kGroup = 2;  // vectors interleaved for instruction-level parallelism
  for (int g0 = 0; g0 < kBlockQuads / kVec; g0 += kGroup) {
    __m256i x0[kGroup], x1[kGroup], x2[kGroup], x3[kGroup];
    for (int g = 0; g < kGroup; ++g) {
      x0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c0 + (g0 + g) * kVec));
      x1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c1 + (g0 + g) * kVec));
      x2[g] = _mm256_setzero_si256();
      x3[g] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < kGroup; ++g) {
        __m256i hi0, lo0, hi1, lo1;
        mul_hilo_avx2(x0[g], m0, hi0, lo0);
        mul_hilo_avx2(x2[g], m1, hi1, lo1);
        x0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[g]), vk0);
        x2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[g]), vk1);
        x1[g] = lo1;
        x3[g] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int g = 0; g < kGroup; ++g) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(c0 + (g0 + g) * kVec), x0[g]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(c1 + (g0 + g) * kVec), x1[g]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(c2 + (g0 + g) * kVec), x2[g]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(c3 + (g0 + g) * kVec), x3[g]);
    }
  }
  box_muller_block(c0, c1, c2, c3, z);
}

// ---- AVX-512: 16 lanes per vector, 4 vectors per block ----

PNI_TARGET_AVX512 PNI_ALWAYS_INLINE void mul_hilo_avx512(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

PNI_TARGET_AVX512 void normal_block_avx512(uint64_t seed, uint64_t ctr0, float* z) {
  alignas(64) uint32_t c0[kBlockQuads], c1[kBlockQuads], c2[kBlockQuads], c3[kBlockQuads];
  init_counters(ctr0, c0, c1);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  constexpr int kVec = 16;
  constexpr int kGroup = kBlockQuads / kVec;  // all 4 vectors interleaved
  __m512i x0[kGroup], x1[kGroup], x2[kGroup], x3[kGroup];
  for (int g = 0; g < kGroup; ++g) {
    x0[g] = _mm512_load_si512(c0 + g * kVec);
    x1[g] = _mm512_load_si512(c1 + g * kVec);
    x2[g] = _mm512_setzero_si512();
    x3[g] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i vk0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i vk1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < kGroup; ++g) {
      __m512i hi0, lo0, hi1, lo1;
      mul_hilo_avx512(x0[g], m0, hi0, lo0);
      mul_hilo_avx512(x2[g], m1, hi1, lo1);
      x0[g] = _mm512_ternarylogic_epi32(hi1, x1[g], vk0, 0x96);  // three-way xor
      x2[g] = _mm512_ternarylogic_epi32(hi0, x3[g], vk1, 0x96);
      x1[g] = lo1;
      x3[g] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int g = 0; g < kGroup; ++g) {
    _mm512_store_si512(c0 + g * kVec, x0[g]);
    _mm512_store_si512(c1 + g * kVec, x1[g]);
    _mm512_store_si512(c2 + g * kVec, x2[g]);
    _mm512_store_si512(c3 + g * kVec, x3[g]);
  }
  box_muller_block(c0, c1, c2, c3, z);
}

#endif  // PNI_X86_DISPATCH

void half_to_float_generic(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = c10::detail::fp16_ieee_to_fp32_value(in[i]);
  }
}

void float_to_half_generic(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = c10::detail::fp16_ieee_from_fp32_value(in[i]);
  }
}

#if PNI_X86_DISPATCH
PNI_TARGET_AVX2 void half_to_float_f16c(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  half_to_float_generic(in + i, out + i, n - i);
}

PNI_TARGET_AVX2 void float_to_half_f16c(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  float_to_half_generic(in + i, out + i, n - i);
}
#endif

using BlockFn = void (*)(uint64_t, uint64_t, float*);
using ToFloatFn = void (*)(const uint16_t*, float*, int64_t);
using ToHalfFn = void (*)(const float*, uint16_t*, int64_t);

struct Variant {
  BlockFn fn;
  const char* name;
  ToFloatFn to_float = &half_to_float_generic;
  ToHalfFn to_half = &float_to_half_generic;
};

constexpr const char* kIsaChoices = "'auto', 'generic', 'avx2' or 'avx512' (or unset)";

// PNI_FAST_CPU_ISA: unset, "" or "auto" picks the widest variant the CPU supports; a
// named variant is used as asked, and is an error where this CPU or build lacks it.
Variant choose_variant() {
  const char* env = std::getenv("PNI_FAST_CPU_ISA");
  const std::string forced = env == nullptr ? "" : env;
  TORCH_CHECK(forced.empty() || forced == "auto" || forced == "generic" || forced == "avx2" || forced == "avx512",
              "PNI_FAST_CPU_ISA must be ", kIsaChoices, ", got '", forced, "'");
  const Variant generic{&normal_block_generic, "generic", &half_to_float_generic, &float_to_half_generic};
  if (forced == "generic") {
    return generic;
  }
#if PNI_X86_DISPATCH
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const Variant avx2{&normal_block_avx2, "avx2", &half_to_float_f16c, &float_to_half_f16c};
  const Variant avx512{&normal_block_avx512, "avx512", &half_to_float_f16c, &float_to_half_f16c};
  TORCH_CHECK(forced != "avx512" || has_avx512,
              "PNI_FAST_CPU_ISA=avx512, but this CPU lacks AVX-512 F/DQ/VL/BW (or AVX2/FMA/BMI2/F16C)");
  TORCH_CHECK(forced != "avx2" || has_avx2, "PNI_FAST_CPU_ISA=avx2, but this CPU lacks AVX2/FMA/BMI2/F16C");
  if (forced == "avx2") {
    return avx2;
  }
  if (has_avx512) {
    return avx512;
  }
  if (has_avx2) {
    return avx2;
  }
#else
  TORCH_CHECK(forced != "avx2" && forced != "avx512", "PNI_FAST_CPU_ISA=", forced,
              ": this build of pni_fast has no x86 SIMD variants (only 'generic')");
#endif
  return generic;
}

// Chosen on first use; a bad PNI_FAST_CPU_ISA throws here (again on every later call).
const Variant& variant() {
  static const Variant v = choose_variant();
  return v;
}

}  // namespace

void normal_block(uint64_t seed, uint64_t ctr0, float* z) { variant().fn(seed, ctr0, z); }

const char* normal_block_isa() { return variant().name; }

void half_to_float(const uint16_t* in, float* out, int64_t n) { variant().to_float(in, out, n); }

void float_to_half(const float* in, uint16_t* out, int64_t n) { variant().to_half(in, out, n); }

}  // namespace cpu
}  // namespace pni_fast
