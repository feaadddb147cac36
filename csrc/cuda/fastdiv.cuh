// Magic-number division (FastDiv): the forward kernels' channelwise alpha index
// (i / inner) % n_alpha without a divide instruction. Host+device; the host computes
// the magic numbers once per tensor (plan_forward in launch_plan.cuh).
#pragma once

#include <cstdint>

#include "../philox.h"

namespace pni_fast {
namespace cuda_impl {

// ---------------------------------------------------------------------------
// Division by a per-tensor constant without a divide instruction (Granlund-Montgomery):
// for a divisor d >= 1, l = ceil(log2 d) and the N-bit magic m = floor(2^N (2^l - d) / d) + 1,
// x / d = (mulhi(x, m) + x) >> l for every 0 <= x < 2^(N-1). The 32-bit magic of the same d
// is ((m64 - 1) >> 32) + 1 (floor(floor(2^64 q) / 2^32) = floor(2^32 q)), for d < 2^31.
// ---------------------------------------------------------------------------

PNI_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

PNI_HD uint64_t mulhi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Host: l and the 64-bit magic of d >= 1.
inline void fastdiv_magic(uint64_t d, uint64_t& magic, int& shift) {
  int l = 0;
  while (l < 63 && (uint64_t{1} << l) < d) ++l;
  shift = l;
  const unsigned __int128 num = (static_cast<unsigned __int128>((uint64_t{1} << l) - d)) << 64;
  magic = static_cast<uint64_t>(num / d) + 1;
}

// x / d for the index type I (int32_t: x < 2^31 and d < 2^31; int64_t: x < 2^63).
template <typename I>
struct FastDiv;

template <>
struct FastDiv<int32_t> {
  uint32_t magic;
  int shift;
  PNI_HD FastDiv(uint64_t magic64, int s) : magic(static_cast<uint32_t>(((magic64 - 1) >> 32) + 1)), shift(s) {}
  PNI_HD int32_t div(int32_t x) const {
    const uint32_t u = static_cast<uint32_t>(x);
    return static_cast<int32_t>((mulhi_u32(u, magic) + u) >> shift);
  }
};

template <>
struct FastDiv<int64_t> {
  uint64_t magic;
  int shift;
  PNI_HD FastDiv(uint64_t magic64, int s) : magic(magic64), shift(s) {}
  PNI_HD int64_t div(int64_t x) const {
    const uint64_t u = static_cast<uint64_t>(x);
    return static_cast<int64_t>((mulhi_u64(u, magic) + u) >> shift);
  }
};

}  // namespace cuda_impl
}  // namespace pni_fast
