// Work decomposition and per-thread bodies of the CUDA kernels (perturb_cuda.cu).
//
// Everything here is host+device (PNI_HD) and free of CUDA intrinsics, so the
// same code also runs in a plain C++ host emulation of the kernels
// (tests/cuda_host_emulation.cpp) that checks the index math against the
// numpy oracle on machines without a GPU. The kernels in perturb_cuda.cu only
// add the thread/warp mapping (threadIdx, __shfl_xor_sync) around these bodies.
//
// Work units:
//   * forward, one tensor: a grid-stride loop over quads (4 elements each), one thread per quad,
//     everything per tensor hoisted out of the loop (fwd_prepare); index type I = int32_t when
//     the tensor has fewer than kMaxInt32Elems elements, else int64_t (chosen at launch);
//     channelwise alpha index (i / inner) % n_alpha by precomputed magic-number division;
//   * forward, list op: one unit = one tile of kThreads quads of one tensor, one thread per quad;
//   * alpha gradient, stage 1: one unit = one warp of kWarpSize lanes;
//       - warp mode: unit u = (segment u / chunks, chunk u % chunks) of kChunk elements,
//         each lane sums quads lane, lane + 32, ... of the chunk, then a warp butterfly;
//       - thread mode (inner < kThreadModeMaxInner): lane l sums segment 32u + l alone;
//       - direct mode (elementwise alpha): lane l writes the gradient of quad 32u + l;
//   * alpha gradient, stage 2: one unit = one block. An alpha index with at least
//     kStage2BlockMin partials gets a whole block (thread-strided sums, a warp butterfly per
//     warp, then thread 0 adds the kWarps warp sums in order); smaller ones get one warp each
//     (kWarps indices per block, lane-strided sums, a warp butterfly). Fixed order either way.
// A segment is a run of `inner` elements that share one alpha index; the tensor has
// segs = n / inner of them and alpha index k owns segments k, k + n_alpha, ...
#pragma once

#include <cstddef>
#include <cstdint>

#include "../philox.h"

namespace pni_fast {
namespace cuda_impl {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Tensors per launch of a list op: the pack must fit the 4 KiB kernel-parameter limit.
constexpr int kMaxPack = 32;
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

// The Philox key and the counter base of one launch: (seed, 0), or the two values of
// the op's rng_state read from device memory by every thread (no host sync, so a CUDA
// graph replay sees the state as the stream left it). Element i of a tensor uses
// counter base + d.offset + i / 4.
struct RngKey {
  uint64_t seed;
  uint64_t base;
};

PNI_HD RngKey make_rng_key(uint64_t seed, const int64_t* state) {
  if (state == nullptr) return RngKey{seed, 0};
  return RngKey{static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1])};
}

// The four normals of quad q of tensor d.
PNI_HD NormalQuad quad_normals(const RngKey& r, const Desc& d, int64_t q) {
  return normal4(r.base + static_cast<uint64_t>(d.offset) + static_cast<uint64_t>(q), r.seed);
}

PNI_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
PNI_HD int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// ---------------------------------------------------------------------------
// Forward: elements 4q .. 4q+3 of one tensor, out = v + (alpha * sigma) * z.
// ---------------------------------------------------------------------------

#if defined(__CUDACC__)
#define PNI_UNROLL _Pragma("unroll")
#else
#define PNI_UNROLL
#endif

// Which alpha rule a forward kernel handles: decided at launch for one tensor, per tile for a list.
enum FwdKind : int {
  kFwdLayerwise = 0,    // one alpha value
  kFwdChannelwise = 1,  // alpha[(i / inner) % n_alpha]
  kFwdList = 2,         // a pack of tensors: either rule, per tensor
};

// Everything the forward needs of one tensor, computed once outside the element loop.
template <typename T, typename I>
struct Fwd {
  const T* v;
  T* out;
  const acc_t<T>* alpha;
  acc_t<T> s;   // sigma
  acc_t<T> as;  // alpha[0] * sigma (one alpha value)
  I n;
  I inner;
  I n_alpha;
  uint64_t ctr;  // Philox counter of quad 0: counter base + offset
  FastDiv<I> div_inner;
  FastDiv<I> div_alpha;
  bool vec;
  bool layerwise;
};

template <typename T, typename I>
PNI_HD Fwd<T, I> fwd_prepare(const Desc& d, const RngKey& rk) {
  const acc_t<T> s = load_sigma<T>(d);
  const acc_t<T>* alpha = static_cast<const acc_t<T>*>(d.alpha);
  const bool layerwise = d.n_alpha == 1;
  return Fwd<T, I>{static_cast<const T*>(d.in), static_cast<T*>(d.out), alpha, s,
                   layerwise ? alpha[0] * s : acc_t<T>(0), static_cast<I>(d.n), static_cast<I>(d.inner),
                   static_cast<I>(d.n_alpha), rk.base + static_cast<uint64_t>(d.offset),
                   FastDiv<I>(d.magic_inner, (d.flags >> kShiftInnerBit) & 0xff),
                   FastDiv<I>(d.magic_alpha, (d.flags >> kShiftAlphaBit) & 0xff),
                   (d.flags & kVecIn) && (d.flags & kVecOut), layerwise};
}

// alpha[(i / inner) % n_alpha] * sigma for i = base .. base + 3 (no divide instruction).
template <typename T, typename I>
PNI_HD void channel_scales(const Fwd<T, I>& f, I base, acc_t<T> (&as)[4]) {
  const I seg = f.div_inner.div(base);
  I r = base - seg * f.inner;
  I k = seg - f.div_alpha.div(seg) * f.n_alpha;
  acc_t<T> a = f.alpha[k] * f.s;
  PNI_UNROLL
  for (int j = 0; j < 4; ++j) {
    as[j] = a;
    if (j < 3 && ++r == f.inner) {
      r = 0;
      if (++k == f.n_alpha) k = 0;
      a = f.alpha[k] * f.s;
    }
  }
}

// Elements 4q .. 4q+3 of one tensor: out = v + (alpha * sigma) * z.
template <int kKind, typename T, typename I>
PNI_HD void fwd_quad(const Fwd<T, I>& f, I q, uint64_t seed) {
  using A = acc_t<T>;
  const I base = 4 * q;
  const NormalQuad z = normal4(f.ctr + static_cast<uint64_t>(q), seed);
  A as[4];
  if (kKind == kFwdLayerwise || (kKind == kFwdList && f.layerwise)) {
    PNI_UNROLL
    for (int j = 0; j < 4; ++j) as[j] = f.as;
  } else {
    channel_scales<T, I>(f, base, as);
  }
  if (f.vec && base + 4 <= f.n) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(f.v + base);
    Vec4<T> y;
    PNI_UNROLL
    for (int j = 0; j < 4; ++j) y.v[j] = static_cast<T>(static_cast<A>(x.v[j]) + as[j] * static_cast<A>(z.z[j]));
    *reinterpret_cast<Vec4<T>*>(f.out + base) = y;
  } else {
    PNI_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (base + j < f.n) {
        f.out[base + j] = static_cast<T>(static_cast<A>(f.v[base + j]) + as[j] * static_cast<A>(z.z[j]));
      }
    }
  }
}

// List kernel: thread `tid` of forward unit (tile) u of tensor d.
template <typename T, typename I>
PNI_HD void perturb_unit_thread(const Desc& d, int64_t u, int tid, const RngKey& rk) {
  const Fwd<T, I> f = fwd_prepare<T, I>(d, rk);
  const I q = static_cast<I>(u) * kThreads + tid;
  if (4 * q < f.n) fwd_quad<kFwdList, T, I>(f, q, rk.seed);
}

// ---------------------------------------------------------------------------
// Alpha gradient
// ---------------------------------------------------------------------------

// Sum of grad_i * z_i over elements [lo, hi) of one tensor, taking quads
// lo/4 + first, + stride, ... (each lane sums its quads in order). I: index type.
template <typename T, typename I>
PNI_HD acc_t<T> range_sum(const Desc& d, I lo, I hi, const RngKey& rk, int first, int stride) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(d.in);
  A acc = 0;
  if (hi <= lo) return acc;
  const uint64_t ctr = rk.base + static_cast<uint64_t>(d.offset);
  const bool vec = (d.flags & kVecIn) != 0;
  const I q_last = (hi - 1) >> 2;
  for (I q = (lo >> 2) + first; q <= q_last; q += stride) {
    const NormalQuad z = normal4(ctr + static_cast<uint64_t>(q), rk.seed);
    const I base = 4 * q;
    if (vec && base >= lo && base + 4 <= hi) {
      const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(g + base);
      PNI_UNROLL
      for (int j = 0; j < 4; ++j) acc += static_cast<A>(x.v[j]) * static_cast<A>(z.z[j]);
    } else {
      PNI_UNROLL
      for (int j = 0; j < 4; ++j) {
        const I i = base + j;
        if (i >= lo && i < hi) acc += static_cast<A>(g[i]) * static_cast<A>(z.z[j]);
      }
    }
  }
  return acc;
}

// Elementwise alpha: grad_alpha_i = grad_i * z_i * sigma (in acc_t<T>) for the 4 elements of quad q.
template <typename T, typename I>
PNI_HD void direct_quad(const Desc& d, I q, const RngKey& rk) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(d.in);
  A* out = static_cast<A*>(d.out);
  const A s = load_sigma<T>(d);
  const I n = static_cast<I>(d.n);
  const I base = 4 * q;
  const NormalQuad z = normal4(rk.base + static_cast<uint64_t>(d.offset) + static_cast<uint64_t>(q), rk.seed);
  if (base + 4 <= n && (d.flags & kVecIn) && (d.flags & kVecOut)) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(g + base);
    Vec4<A> y;
    PNI_UNROLL
    for (int j = 0; j < 4; ++j) y.v[j] = static_cast<A>(x.v[j]) * static_cast<A>(z.z[j]) * s;
    *reinterpret_cast<Vec4<A>*>(out + base) = y;
  } else {
    PNI_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (base + j < n) out[base + j] = static_cast<A>(g[base + j]) * static_cast<A>(z.z[j]) * s;
    }
  }
}

// Stage 1, thread and direct modes: lane `lane` of unit u does all its work alone.
template <typename T, typename I>
PNI_HD void stage1_lane_alone(const Desc& d, int64_t u, int lane, const RngKey& rk, acc_t<T>* part) {
  if (d.mode == kDirectMode) {
    const I q = static_cast<I>(u) * kWarpSize + lane;
    if (4 * q < static_cast<I>(d.n)) direct_quad<T, I>(d, q, rk);
  } else {
    const I s = static_cast<I>(u) * kWarpSize + lane;
    if (s < static_cast<I>(d.segs)) {
      const I inner = static_cast<I>(d.inner);
      const I lo = s * inner;
      const I n = static_cast<I>(d.n);
      part[d.part_base + s] = range_sum<T, I>(d, lo, lo + inner < n ? lo + inner : n, rk, 0, 1);
    }
  }
}

// Stage 1, warp mode: lane `lane`'s share of unit u = (segment u / chunks, chunk u % chunks);
// the warp's sum goes to part[part_base + u]. One 64-bit division per warp task of kChunk elements.
template <typename T, typename I>
PNI_HD acc_t<T> stage1_lane_value(const Desc& d, int64_t u, int lane, const RngKey& rk) {
  const int64_t s = u / d.chunks;
  const int64_t c = u - s * d.chunks;
  const int64_t seg_end = min64((s + 1) * d.inner, d.n);
  const int64_t lo = s * d.inner + c * kChunk;
  const int64_t hi = min64(lo + kChunk, seg_end);
  return range_sum<T, I>(d, static_cast<I>(lo), static_cast<I>(hi), rk, lane, kWarpSize);
}

// Stage 2: thread `tid` of `nthreads`' share of alpha index k (rows r and chunks c in a fixed
// order: e = tid, tid + nthreads, ...). nthreads is kThreads (a block per index) or kWarpSize.
template <typename T>
PNI_HD acc_t<T> stage2_thread_value(const Desc& d, int64_t k, int tid, int nthreads, const acc_t<T>* part) {
  using A = acc_t<T>;
  const int64_t rows = d.segs / d.n_alpha;
  const int64_t count = rows * d.chunks;
  const A* p = part + d.part_base;
  A acc = 0;
  for (int64_t e = tid; e < count; e += nthreads) {
    const int64_t r = d.chunks == 1 ? e : e / d.chunks;  // one partial per segment: no division
    const int64_t c = e - r * d.chunks;
    acc += p[(r * d.n_alpha + k) * d.chunks + c];
  }
  return acc;
}

// Stage 2, block per index: thread 0 adds the warps' butterfly sums in warp order.
template <typename A>
PNI_HD A block_combine(const A (&warp_sums)[kWarps]) {
  A s = warp_sums[0];
  for (int w = 1; w < kWarps; ++w) s += warp_sums[w];
  return s;
}

// Stage-2 unit u of tensor d: a whole block for alpha index u (kStage2Block), or warp w of the
// block for alpha index u * kWarps + w (returns -1 when that index does not exist).
PNI_HD int64_t stage2_index(const Desc& d, int64_t u, int warp) {
  if (d.flags & kStage2Block) return u;
  const int64_t k = u * kWarps + warp;
  return k < d.n_alpha ? k : -1;
}

template <typename T>
PNI_HD void stage2_store(const Desc& d, int64_t k, acc_t<T> sum) {
  static_cast<acc_t<T>*>(d.out)[k] = sum * load_sigma<T>(d);
}

// ---------------------------------------------------------------------------
// Host-side planning (shared by the launcher and the host emulation)
// ---------------------------------------------------------------------------

// DescFlags of a tensor: sigma's dtype and whether `in` / `out` (elements of in_elem /
// out_elem bytes) allow 4-element vector accesses.
inline int32_t make_flags(bool sigma_is_float, const void* in, size_t in_elem, const void* out, size_t out_elem) {
  int32_t f = sigma_is_float ? kSigmaFloat : 0;
  if (reinterpret_cast<uintptr_t>(in) % (4 * in_elem) == 0) f |= kVecIn;
  if (reinterpret_cast<uintptr_t>(out) % (4 * out_elem) == 0) f |= kVecOut;
  return f;
}

inline int64_t forward_units(const Desc& d) { return cdiv64(cdiv64(d.n, 4), kThreads); }

// Forward: the magic numbers of a tensor's inner and n_alpha (the list kernel and the
// channelwise kernel divide by them); d.n, d.n_alpha and d.inner set.
inline void plan_forward(Desc& d) {
  uint64_t m = 1;
  int si = 0, sa = 0;
  fastdiv_magic(static_cast<uint64_t>(d.inner), m, si);
  d.magic_inner = m;
  fastdiv_magic(static_cast<uint64_t>(d.n_alpha), m, sa);
  d.magic_alpha = m;
  d.flags = (d.flags & 0xffff) | (si << kShiftInnerBit) | (sa << kShiftAlphaBit);
}

// The forward kernel a pack runs: its FwdKind and whether 32-bit indices suffice.
inline int forward_kind(const Pack& p) {
  if (p.count > 1) return kFwdList;
  return p.d[0].n_alpha == 1 ? kFwdLayerwise : kFwdChannelwise;
}

// True when every tensor of the pack (and its unit count) fits the 32-bit index kernels.
inline bool fits_int32(const Pack& p) {
  for (int j = 0; j < p.count; ++j) {
    if (p.d[j].n >= kMaxInt32Elems) return false;
  }
  return p.start[p.count] < kMaxInt32Elems;
}

struct GradPlan {
  int64_t units1;  // stage-1 warp units
  int64_t units2;  // stage-2 block units (0 in direct mode)
  int64_t parts;   // stage-1 partials
};

// Fills d.inner/segs/chunks/mode/part_base (and the kStage2Block flag) for a tensor with d.n > 0 and d.n_alpha set;
// `inner` is the op's argument (ignored for a layerwise alpha).
inline GradPlan plan_alpha_grad(Desc& d, int64_t inner, int64_t part_base) {
  GradPlan plan{0, 0, 0};
  d.inner = d.n_alpha == 1 ? d.n : inner;  // layerwise: the whole tensor is one segment
  d.segs = d.n / d.inner;                  // exact: the op checks n % (inner * n_alpha) == 0
  d.part_base = part_base;
  if (d.inner == 1 && d.n_alpha == d.n) {
    d.mode = kDirectMode;
    d.chunks = 0;
    plan.units1 = cdiv64(cdiv64(d.n, 4), kWarpSize);
  } else if (d.inner < kThreadModeMaxInner) {
    d.mode = kThreadMode;
    d.chunks = 1;
    plan.units1 = cdiv64(d.segs, kWarpSize);
    plan.parts = d.segs;
  } else {
    d.mode = kWarpMode;
    d.chunks = cdiv64(d.inner, kChunk);
    plan.units1 = d.segs * d.chunks;
    plan.parts = d.segs * d.chunks;
  }
  if (d.mode != kDirectMode) {
    // partials per alpha index: a block when there are many (layerwise alpha of a big tensor)
    if ((d.segs / d.n_alpha) * d.chunks >= kStage2BlockMin) {
      d.flags |= kStage2Block;
      plan.units2 = d.n_alpha;
    } else {
      d.flags &= ~kStage2Block;
      plan.units2 = cdiv64(d.n_alpha, kWarps);
    }
  }
  return plan;
}

// Plans one alpha-gradient launch. stage1.count and stage1.d[0 .. count) are set, each Desc
// with n > 0, n_alpha, and the op's `inner` in d.inner. Fills every Desc (plan_alpha_grad,
// partials numbered in pack order) and stage1.start over the stage-1 units; stage2 becomes
// stage1 with starts over the stage-2 units. Returns the totals of units1, units2 and parts.
inline GradPlan plan_alpha_grad_pack(Pack& stage1, Pack& stage2) {
  GradPlan total{0, 0, 0};
  int64_t units2[kMaxPack];
  for (int j = 0; j < stage1.count; ++j) {
    Desc& d = stage1.d[j];
    const GradPlan plan = plan_alpha_grad(d, d.inner, total.parts);
    stage1.start[j] = total.units1;
    total.units1 += plan.units1;
    total.parts += plan.parts;
    units2[j] = plan.units2;
  }
  stage1.start[stage1.count] = total.units1;
  stage2 = stage1;
  for (int j = 0; j < stage1.count; ++j) {
    stage2.start[j] = total.units2;
    total.units2 += units2[j];
  }
  stage2.start[stage1.count] = total.units2;
  return total;
}

}  // namespace cuda_impl
}  // namespace pni_fast
