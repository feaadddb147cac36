// Work decomposition and per-thread bodies of the CUDA kernels (perturb_cuda.cu).
//
// Everything here is host+device (PNI_HD) and free of CUDA intrinsics, so the
// same code also runs in a plain C++ host emulation of the kernels
// (tests/cuda_host_emulation.cpp) that checks the index math against the
// numpy oracle on machines without a GPU. The kernels in perturb_cuda.cu only
// add the thread/warp mapping (threadIdx, __shfl_xor_sync) around these bodies.
//
// Work units:
//   * forward: one unit = one tile of kThreads quads (4 elements each), one thread per quad;
//   * alpha gradient, stage 1: one unit = one warp of kWarpSize lanes;
//       - warp mode: unit u = (segment u / chunks, chunk u % chunks) of kChunk elements,
//         each lane sums quads lane, lane + 32, ... of the chunk, then a warp butterfly;
//       - thread mode (inner < kThreadModeMaxInner): lane l sums segment 32u + l alone;
//       - direct mode (elementwise alpha): lane l writes the gradient of quad 32u + l;
//   * alpha gradient, stage 2: one unit = one warp per alpha index k, summing its
//     rows * chunks partials in a fixed lane-strided order, then a warp butterfly.
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
};

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
  int32_t mode;       // GradMode
  int32_t flags;      // DescFlags
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

template <typename T>
PNI_HD void perturb_quad(const Desc& d, int64_t q, const RngKey& rk) {
  using A = acc_t<T>;
  const T* v = static_cast<const T*>(d.in);
  T* out = static_cast<T*>(d.out);
  const A* alpha = static_cast<const A*>(d.alpha);
  const int64_t base = 4 * q;
  const NormalQuad z = quad_normals(rk, d, q);
  const A s = load_sigma<T>(d);
  A as[4];
  if (d.n_alpha == 1) {
    const A a = alpha[0] * s;
    for (int j = 0; j < 4; ++j) as[j] = a;
  } else {
    // alpha index (i / inner) % n_alpha, one 64-bit division per quad
    int64_t k = (base / d.inner) % d.n_alpha;
    int64_t r = base % d.inner;
    for (int j = 0; j < 4; ++j) {
      as[j] = alpha[k] * s;
      if (++r == d.inner) {
        r = 0;
        if (++k == d.n_alpha) k = 0;
      }
    }
  }
  const int64_t m = d.n - base;
  if (m >= 4 && (d.flags & kVecIn) && (d.flags & kVecOut)) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(v + base);
    Vec4<T> y;
    for (int j = 0; j < 4; ++j) y.v[j] = static_cast<T>(static_cast<A>(x.v[j]) + as[j] * static_cast<A>(z.z[j]));
    *reinterpret_cast<Vec4<T>*>(out + base) = y;
  } else {
    for (int j = 0; j < 4; ++j) {
      if (j < m) out[base + j] = static_cast<T>(static_cast<A>(v[base + j]) + as[j] * static_cast<A>(z.z[j]));
    }
  }
}

// Thread `tid` of forward unit `u` of tensor d.
template <typename T>
PNI_HD void perturb_unit_thread(const Desc& d, int64_t u, int tid, const RngKey& rk) {
  const int64_t q = u * kThreads + tid;
  if (4 * q < d.n) perturb_quad<T>(d, q, rk);
}

// ---------------------------------------------------------------------------
// Alpha gradient
// ---------------------------------------------------------------------------

// Sum of grad_i * z_i over elements [lo, hi) of one tensor, taking quads
// lo/4 + first, + stride, ... (each lane sums its quads in order).
template <typename T>
PNI_HD acc_t<T> range_sum(const Desc& d, int64_t lo, int64_t hi, const RngKey& rk, int first, int stride) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(d.in);
  A acc = 0;
  if (hi <= lo) return acc;
  const int64_t q_last = (hi - 1) / 4;
  for (int64_t q = lo / 4 + first; q <= q_last; q += stride) {
    const NormalQuad z = quad_normals(rk, d, q);
    const int64_t base = 4 * q;
    if (base >= lo && base + 4 <= hi && (d.flags & kVecIn)) {
      const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(g + base);
      for (int j = 0; j < 4; ++j) acc += static_cast<A>(x.v[j]) * static_cast<A>(z.z[j]);
    } else {
      for (int j = 0; j < 4; ++j) {
        const int64_t i = base + j;
        if (i >= lo && i < hi) acc += static_cast<A>(g[i]) * static_cast<A>(z.z[j]);
      }
    }
  }
  return acc;
}

// Elementwise alpha: grad_alpha_i = grad_i * z_i * sigma (in acc_t<T>) for the 4 elements of quad q.
template <typename T>
PNI_HD void direct_quad(const Desc& d, int64_t q, const RngKey& rk) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(d.in);
  A* out = static_cast<A*>(d.out);
  const A s = load_sigma<T>(d);
  const int64_t base = 4 * q;
  const NormalQuad z = quad_normals(rk, d, q);
  const int64_t m = d.n - base;
  if (m >= 4 && (d.flags & kVecIn) && (d.flags & kVecOut)) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(g + base);
    Vec4<A> y;
    for (int j = 0; j < 4; ++j) y.v[j] = static_cast<A>(x.v[j]) * static_cast<A>(z.z[j]) * s;
    *reinterpret_cast<Vec4<A>*>(out + base) = y;
  } else {
    for (int j = 0; j < 4; ++j) {
      if (j < m) out[base + j] = static_cast<A>(g[base + j]) * static_cast<A>(z.z[j]) * s;
    }
  }
}

// Stage 1, thread and direct modes: lane `lane` of unit u does all its work alone.
template <typename T>
PNI_HD void stage1_lane_alone(const Desc& d, int64_t u, int lane, const RngKey& rk, acc_t<T>* part) {
  if (d.mode == kDirectMode) {
    const int64_t q = u * kWarpSize + lane;
    if (4 * q < d.n) direct_quad<T>(d, q, rk);
  } else {
    const int64_t s = u * kWarpSize + lane;
    if (s < d.segs) {
      const int64_t lo = s * d.inner;
      part[d.part_base + s] = range_sum<T>(d, lo, min64(lo + d.inner, d.n), rk, 0, 1);
    }
  }
}

// Stage 1, warp mode: lane `lane`'s share of unit u = (segment u / chunks, chunk u % chunks);
// the warp's sum goes to part[part_base + u].
template <typename T>
PNI_HD acc_t<T> stage1_lane_value(const Desc& d, int64_t u, int lane, const RngKey& rk) {
  const int64_t s = u / d.chunks;
  const int64_t c = u - s * d.chunks;
  const int64_t seg_end = min64((s + 1) * d.inner, d.n);
  const int64_t lo = s * d.inner + c * kChunk;
  const int64_t hi = min64(lo + kChunk, seg_end);
  return range_sum<T>(d, lo, hi, rk, lane, kWarpSize);
}

// Stage 2: lane `lane`'s share of alpha index k (rows r and chunks c in a fixed order);
// the warp's sum times sigma is the gradient of alpha[k].
template <typename T>
PNI_HD acc_t<T> stage2_lane_value(const Desc& d, int64_t k, int lane, const acc_t<T>* part) {
  using A = acc_t<T>;
  const int64_t rows = d.segs / d.n_alpha;
  const int64_t count = rows * d.chunks;
  const A* p = part + d.part_base;
  A acc = 0;
  for (int64_t e = lane; e < count; e += kWarpSize) {
    const int64_t r = e / d.chunks;
    const int64_t c = e - r * d.chunks;
    acc += p[(r * d.n_alpha + k) * d.chunks + c];
  }
  return acc;
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

struct GradPlan {
  int64_t units1;  // stage-1 warp units
  int64_t units2;  // stage-2 warp units (one per alpha index; 0 in direct mode)
  int64_t parts;   // stage-1 partials
};

// Fills d.inner/segs/chunks/mode/part_base for a tensor with d.n > 0 and d.n_alpha set;
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
    plan.units2 = d.n_alpha;
    plan.parts = d.segs;
  } else {
    d.mode = kWarpMode;
    d.chunks = cdiv64(d.inner, kChunk);
    plan.units1 = d.segs * d.chunks;
    plan.units2 = d.n_alpha;
    plan.parts = d.segs * d.chunks;
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
