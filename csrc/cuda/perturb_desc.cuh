// The launch table of the perturb kernels (Desc, Pack) and what every per-thread body uses:
// the block/warp/pack constants, the math dtype acc_t<T>, 4-element vectors, the Philox
// key of a launch (RngKey), the tensor of a work unit (find_desc) and sigma's value.
// Host+device (PNI_HD), no CUDA intrinsics: the host emulation includes it too
// (see perturb_impl.cuh, which includes every part).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../philox.h"

namespace pni_fast {
namespace cuda_impl {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Tensors per launch of a list op: the pack must fit the 4 KiB kernel-parameter limit
// (31 descriptors of 120 bytes and their 32 starts: 3984 bytes).
constexpr int kMaxPack = 31;
// Elements per warp task in stage 1 of the alpha gradient.
constexpr int64_t kChunk = 2048;
// Segments shorter than this are summed by one lane each (thread mode).
constexpr int64_t kThreadModeMaxInner = 64;
// Stage 2: alpha indices with at least this many partials are summed by a whole block.
constexpr int64_t kStage2BlockMin = 4 * kThreads;
// Tensors with fewer elements run the 32-bit index kernels (4 * quad index + 4 stays below 2^31).
constexpr int64_t kMaxInt32Elems = (int64_t{1} << 31) - 1024;

// How stage 1 of the alpha gradient treats one tensor.
enum GradMode : int32_t {
  kWarpMode = 0,    // one warp per (segment, chunk of kChunk elements)
  kThreadMode = 1,  // one lane per segment (short segments)
  kDirectMode = 2,  // elementwise alpha (inner == 1, n_alpha == n): the gradient itself, no stage 2
};

enum DescFlags : int32_t {
  kSigmaFloat = 1,  // sigma is float32 (else v's dtype)
  kVecIn = 2,       // `in` is aligned to 4 elements: vector loads
  kVecOut = 4,      // `out` is aligned to 4 elements: vector stores
  kStage2Block = 8, // alpha gradient: stage 2 sums each alpha index with a whole block
};
// Bits 16..23 / 24..31 of Desc::flags: the shifts of the magic numbers for inner / n_alpha.
constexpr int kShiftInnerBit = 16;
constexpr int kShiftAlphaBit = 24;

// One tensor of a launch. alpha and the alpha gradient are in the math dtype acc_t<T>
// (float32, float64 for float64 tensors): the host converts alpha (any accepted dtype)
// before the launch and the gradient to alpha's dtype after it.
struct Desc {
  const void* in;     // v (forward) or grad (alpha gradient), dtype T
  void* out;          // perturbed output (forward, T) or alpha gradient (acc_t<T>)
  const void* alpha;  // acc_t<T>, n_alpha elements
  const void* sigma;  // 0-d, float32 or T
  int64_t n;
  int64_t n_alpha;
  int64_t inner;      // alpha gradient: effective inner (layerwise: n)
  int64_t offset;     // first Philox counter (before the launch's counter base)
  uint64_t seed;      // Philox key of this tensor (unused with an rng_state: the state's seed)
  int64_t segs;       // alpha gradient: number of segments
  int64_t chunks;     // alpha gradient: partials per segment
  int64_t part_base;  // alpha gradient: first partial of this tensor
  uint64_t magic_inner;  // forward, n_alpha > 1: x / inner by magic-number division (FastDiv)
  uint64_t magic_alpha;  // forward, n_alpha > 1: x / n_alpha
  int32_t mode;       // GradMode
  int32_t flags;      // DescFlags, plus the two magic shifts
};

// Up to kMaxPack tensors; work unit u belongs to tensor t when start[t] <= u < start[t+1].
struct Pack {
  Desc d[kMaxPack];
  int64_t start[kMaxPack + 1];
  int32_t count;
};
static_assert(sizeof(Pack) <= 4096, "Pack must fit the 4 KiB kernel parameter limit");

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Four consecutive elements; the alignment makes one load/store instruction per
// 16 bytes (float4, 2x double2, or one 64-bit access for 16-bit types).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// The Philox key and the counter base of one tensor: (seed, 0), or the two values of the
// op's rng_state read from device memory by every thread (no host sync, so a CUDA graph
// replay sees the state as the stream left it). Element i of a tensor uses counter
// base + d.offset + i / 4.
struct RngKey {
  uint64_t seed;
  uint64_t base;
};

PNI_HD RngKey make_rng_key(uint64_t seed, const int64_t* state) {
  if (state == nullptr) return RngKey{seed, 0};
  return RngKey{static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1])};
}

// The key of tensor d of a pack: its own seed (a list op's seeds[i], or the one seed every
// tensor shares), or the rng_state's seed for every tensor.
PNI_HD RngKey make_rng_key(const Desc& d, const int64_t* state) { return make_rng_key(d.seed, state); }

// The four normals of quad q of tensor d.
PNI_HD NormalQuad quad_normals(const RngKey& r, const Desc& d, int64_t q) {
  return normal4(r.base + static_cast<uint64_t>(d.offset) + static_cast<uint64_t>(q), r.seed);
}

PNI_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
PNI_HD int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

PNI_HD int find_desc(const Pack& p, int64_t unit) {
  int t = 0;
  while (t + 1 < p.count && unit >= p.start[t + 1]) ++t;
  return t;
}

template <typename T>
PNI_HD acc_t<T> load_sigma(const Desc& d) {
  using A = acc_t<T>;
  if (d.flags & kSigmaFloat) return static_cast<A>(*static_cast<const float*>(d.sigma));
  return static_cast<A>(*static_cast<const T*>(d.sigma));
}

// `#pragma unroll` for nvcc; nothing for the host compiler of the emulation.
#if defined(__CUDACC__)
#define PNI_UNROLL _Pragma("unroll")
#else
#define PNI_UNROLL
#endif

}  // namespace cuda_impl
}  // namespace pni_fast
