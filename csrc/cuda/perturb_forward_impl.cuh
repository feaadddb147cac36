// Per-thread bodies of the perturb forward kernels (perturb_cuda.cu): one quad of 4
// elements, out = v + (alpha * sigma) * z, with everything per tensor hoisted (fwd_prepare).
// Host+device, so the host emulation runs the same code (see perturb_impl.cuh).
#pragma once

#include <cstdint>

#include "../philox.h"
#include "fastdiv.cuh"
#include "perturb_desc.cuh"

namespace pni_fast {
namespace cuda_impl {

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

}  // namespace cuda_impl
}  // namespace pni_fast
