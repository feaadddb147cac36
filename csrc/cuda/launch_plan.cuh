// Host-side planning of the perturb launches, shared by the CUDA launchers and the host
// emulation: vector-access flags, the forward's units, magic numbers and kernel choice,
// and the alpha gradient's modes, partials and stage-2 units (plan_alpha_grad_pack).
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastdiv.cuh"
#include "perturb_desc.cuh"
#include "perturb_forward_impl.cuh"

namespace pni_fast {
namespace cuda_impl {

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
