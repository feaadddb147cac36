// Per-thread bodies of the alpha-gradient kernels (perturb_alpha_grad_cuda.cu): stage 1
// (range sums of grad * z, the elementwise direct mode) and stage 2 (fixed-order sums of
// the partials, scaled by sigma). The work units and modes are described in perturb_impl.cuh.
// Host+device, so the host emulation runs the same code.
#pragma once

#include <cstdint>

#include "../philox.h"
#include "perturb_desc.cuh"

namespace pni_fast {
namespace cuda_impl {

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

}  // namespace cuda_impl
}  // namespace pni_fast
