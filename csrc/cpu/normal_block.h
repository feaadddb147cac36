// Block generator of the design.md normals for the CPU kernels.
//
// One call produces the 256 normals of 64 consecutive Philox counters. The
// work is laid out as loops over lane arrays (Philox round outermost, lanes
// innermost; one loop for log, one for sin/cos, then the interleave) so the
// compiler vectorizes every step; design.md section 10 measured this layout.
#pragma once

#include <cstdint>

// no-alias hint for the kernel loops (spelled differently by MSVC)
#if defined(_MSC_VER)
#define PNI_RESTRICT __restrict
#else
#define PNI_RESTRICT __restrict__
#endif

namespace pni_fast {
namespace cpu {

constexpr int kBlockQuads = 64;                 // Philox counters per block
constexpr int kBlockElems = 4 * kBlockQuads;    // normals per block

// z[0..255] = normals of counters ctr0 .. ctr0 + 63 under `seed`, in element
// order (z[4j + w] = output w of counter ctr0 + j). Uses the widest SIMD the
// running CPU supports; every variant returns identical bits.
void normal_block(uint64_t seed, uint64_t ctr0, float* z);

// IEEE binary16 <-> float32 for n values (round to nearest even), with F16C
// where the CPU has it; c10::Half's conversions give the same values.
void half_to_float(const uint16_t* in, float* out, int64_t n);
void float_to_half(const float* in, uint16_t* out, int64_t n);

// Name of the SIMD variant normal_block() runs: "avx512", "avx2" or "generic".
const char* normal_block_isa();

}  // namespace cpu
}  // namespace pni_fast
