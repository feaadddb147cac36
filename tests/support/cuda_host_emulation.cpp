// Host emulation of the CUDA kernels in csrc/cuda/perturb_cuda.cu and perturb_alpha_grad_cuda.cu, for machines
// without a GPU (tests/backends/test_cuda_compile.py builds it with the host compiler and
// calls it through ctypes).
//
// It runs the very same per-thread bodies (csrc/cuda/perturb_impl.cuh) with the
// kernels' work mapping: packs of up to kMaxPack tensors, every unit of a pack,
// every thread/lane of a unit, and the warp butterfly of __shfl_xor_sync
// reproduced exactly (new_l = v_l + v_(l xor o) for o = 16, 8, 4, 2, 1; lane 0
// keeps the result), and stage 2's block reduction (a butterfly per warp, then thread 0 adds
// the warp sums in warp order). Grid-stride order does not matter: units write disjoint
// outputs. The launcher's choices (32- or 64-bit index, forward kernel kind, stage-2 block or
// warp) are made by the same functions (fits_int32, forward_kind, plan_alpha_grad); the index
// type can be forced for tests (emu_set_index_bits). So the index math, modes, chunking and the two-stage reduction are
// checked against the numpy oracle here, and only the CUDA-specific parts
// (launch, shuffles, vector instructions) are left to the GPU run.
#include <cstdint>
#include <vector>

#ifdef PNI_EMU_WITH_C10  // header-only c10 types from torch's include dir: 16-bit paths too
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#endif

#include "../../csrc/cuda/perturb_impl.cuh"

using namespace pni_fast;
using namespace pni_fast::cuda_impl;

namespace {

template <typename A>
A warp_sum_emulated(A (&v)[kWarpSize]) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    A next[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) next[l] = v[l] + v[l ^ o];
    for (int l = 0; l < kWarpSize; ++l) v[l] = next[l];
  }
  return v[0];
}

// alpha (perturb) and the alpha gradient (emu_alpha_grad's out) are in acc_t<T>, as the
// CUDA launcher passes them; seed: each tensor's Philox key.
struct Args {
  int count;
  const void* const* in;
  void* const* out;
  const void* const* alpha;
  const void* const* sigma;
  const int32_t* sigma_float;
  const int64_t* n;
  const int64_t* n_alpha;
  const int64_t* inner;
  const int64_t* offset;
  const uint64_t* seed;
  size_t elem;      // bytes per element of in
  size_t out_elem;  // bytes per element of out
};

Desc make_desc(const Args& a, int i) {
  Desc d{};
  d.in = a.in[i];
  d.out = a.out[i];
  d.alpha = a.alpha[i];
  d.sigma = a.sigma[i];
  d.n = a.n[i];
  d.n_alpha = a.n_alpha[i];
  d.inner = a.inner[i];
  d.offset = a.offset[i];
  d.seed = a.seed[i];
  d.flags = make_flags(a.sigma_float[i] != 0, d.in, a.elem, d.out, a.out_elem);
  return d;
}

// Non-empty tensors in packs of kMaxPack (the emulation has one dtype per call).
std::vector<std::vector<int>> packs_of(const Args& a) {
  std::vector<std::vector<int>> packs;
  std::vector<int> cur;
  for (int i = 0; i < a.count; ++i) {
    if (a.n[i] == 0) continue;
    cur.push_back(i);
    if (static_cast<int>(cur.size()) == kMaxPack) {
      packs.push_back(cur);
      cur.clear();
    }
  }
  if (!cur.empty()) packs.push_back(cur);
  return packs;
}

// Index type of the emulated kernels: 0 = as the launcher chooses (fits_int32), 32 or 64 forced.
int g_index_bits = 0;

bool use_int32(const Pack& p) { return g_index_bits == 0 ? fits_int32(p) : g_index_bits == 32; }

// Every thread of every unit of one forward launch, with the launcher's kernel choice; each
// tensor's key as the kernels take it (make_rng_key of its Desc and the state).
template <typename T, typename I>
void perturb_pack(const Pack& pack, const int64_t* state) {
  const int kind = forward_kind(pack);
  if (kind == kFwdList) {
    for (int64_t unit = 0; unit < pack.start[pack.count]; ++unit) {
      const int t = find_desc(pack, unit);
      const RngKey rk = make_rng_key(pack.d[t], state);
      for (int tid = 0; tid < kThreads; ++tid) perturb_unit_thread<T, I>(pack.d[t], unit - pack.start[t], tid, rk);
    }
    return;
  }
  // one tensor: the grid-stride loop over quads; every quad once, order irrelevant (disjoint writes)
  const RngKey rk = make_rng_key(pack.d[0], state);
  const Fwd<T, I> f = fwd_prepare<T, I>(pack.d[0], rk);
  const I nq = static_cast<I>((static_cast<int64_t>(f.n) + 3) >> 2);
  for (I q = 0; q < nq; ++q) {
    if (kind == kFwdLayerwise) {
      fwd_quad<kFwdLayerwise, T, I>(f, q, rk.seed);
    } else {
      fwd_quad<kFwdChannelwise, T, I>(f, q, rk.seed);
    }
  }
}

template <typename T>
void perturb(const Args& a, const int64_t* state) {
  for (const auto& idx : packs_of(a)) {
    Pack pack{};
    pack.count = static_cast<int32_t>(idx.size());
    int64_t units = 0;
    for (size_t j = 0; j < idx.size(); ++j) {
      pack.d[j] = make_desc(a, idx[j]);
      pack.start[j] = units;
      units += forward_units(pack.d[j]);
    }
    pack.start[idx.size()] = units;
    for (size_t j = 0; j < idx.size(); ++j) plan_forward(pack.d[j]);
    if (use_int32(pack)) {
      perturb_pack<T, int32_t>(pack, state);
    } else {
      perturb_pack<T, int64_t>(pack, state);
    }
  }
}

// Stage 1 of one pack: every lane of every warp unit.
template <typename T, typename I>
void stage1_pack(const Pack& stage1, int64_t units1, const int64_t* state, std::vector<acc_t<T>>& part) {
  using A = acc_t<T>;
  for (int64_t unit = 0; unit < units1; ++unit) {
    const int t = find_desc(stage1, unit);
    const Desc& d = stage1.d[t];
    const RngKey rk = make_rng_key(d, state);
    const int64_t u = unit - stage1.start[t];
    if (d.mode == kWarpMode) {
      A v[kWarpSize];
      for (int lane = 0; lane < kWarpSize; ++lane) v[lane] = stage1_lane_value<T, I>(d, u, lane, rk);
      part[d.part_base + u] = warp_sum_emulated(v);
    } else {
      for (int lane = 0; lane < kWarpSize; ++lane) stage1_lane_alone<T, I>(d, u, lane, rk, part.data());
    }
  }
}

// Stage 2 of one pack: block units; a block per alpha index (thread sums, a butterfly per warp,
// thread 0 adds the warp sums in order) or a warp per alpha index.
template <typename T>
void stage2_pack(const Pack& stage2, int64_t total2, const std::vector<acc_t<T>>& part) {
  using A = acc_t<T>;
  for (int64_t unit = 0; unit < total2; ++unit) {
    const int t = find_desc(stage2, unit);
    const Desc& d = stage2.d[t];
    const int64_t u = unit - stage2.start[t];
    if (d.flags & kStage2Block) {
      A warp_sums[kWarps];
      for (int w = 0; w < kWarps; ++w) {
        A v[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane) {
          v[lane] = stage2_thread_value<T>(d, u, w * kWarpSize + lane, kThreads, part.data());
        }
        warp_sums[w] = warp_sum_emulated(v);
      }
      stage2_store<T>(d, u, block_combine(warp_sums));
    } else {
      for (int w = 0; w < kWarps; ++w) {
        const int64_t k = stage2_index(d, u, w);
        if (k < 0) continue;
        A v[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane) v[lane] = stage2_thread_value<T>(d, k, lane, kWarpSize, part.data());
        stage2_store<T>(d, k, warp_sum_emulated(v));
      }
    }
  }
}

template <typename T>
void alpha_grad(const Args& a, const int64_t* state) {
  using A = acc_t<T>;
  for (const auto& idx : packs_of(a)) {
    Pack stage1{};
    stage1.count = static_cast<int32_t>(idx.size());
    for (size_t j = 0; j < idx.size(); ++j) stage1.d[j] = make_desc(a, idx[j]);  // d.inner = the op's inner
    Pack stage2{};
    const GradPlan total = plan_alpha_grad_pack(stage1, stage2);
    // NaN-filled: a partial that stage 2 reads but stage 1 never wrote shows up in the result.
    std::vector<A> part(total.parts > 0 ? total.parts : 1, static_cast<A>(0.0 / 0.0));
    if (use_int32(stage1)) {
      stage1_pack<T, int32_t>(stage1, total.units1, state, part);
    } else {
      stage1_pack<T, int64_t>(stage1, total.units1, state, part);
    }
    stage2_pack<T>(stage2, total.units2, part);
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64, 2 = float16, 3 = bfloat16 (2 and 3 only when built with
// PNI_EMU_WITH_C10). alpha is float64 for dtype 1, else float32; so is emu_alpha_grad's out.
// seed: one Philox key per tensor (a list op's seeds, or its one seed repeated). state: nullptr,
// or the two int64 values of an rng_state (seed, counter base) that replace every tensor's seed
// and add to every offset, read the way the kernels read them (make_rng_key).
// Returns 0 on success, 1 for an unsupported dtype.
int emu_perturb(int dtype, int count, const void* const* in, void* const* out, const void* const* alpha,
                const void* const* sigma, const int32_t* sigma_float, const int64_t* n, const int64_t* n_alpha,
                const int64_t* inner, const int64_t* offset, const uint64_t* seed, const int64_t* state) {
  const size_t elem = dtype == 1 ? 8u : dtype == 0 ? 4u : 2u;
  Args a{count, in, out, alpha, sigma, sigma_float, n, n_alpha, inner, offset, seed, elem, elem};
  switch (dtype) {
    case 0: perturb<float>(a, state); return 0;
    case 1: perturb<double>(a, state); return 0;
#ifdef PNI_EMU_WITH_C10
    case 2: perturb<c10::Half>(a, state); return 0;
    case 3: perturb<c10::BFloat16>(a, state); return 0;
#endif
    default: return 1;
  }
}

int emu_alpha_grad(int dtype, int count, const void* const* grad, void* const* out, const void* const* alpha,
                   const void* const* sigma, const int32_t* sigma_float, const int64_t* n, const int64_t* n_alpha,
                   const int64_t* inner, const int64_t* offset, const uint64_t* seed, const int64_t* state) {
  const size_t elem = dtype == 1 ? 8u : dtype == 0 ? 4u : 2u;
  Args a{count, grad, out, alpha, sigma, sigma_float, n, n_alpha, inner, offset, seed, elem, dtype == 1 ? 8u : 4u};
  switch (dtype) {
    case 0: alpha_grad<float>(a, state); return 0;
    case 1: alpha_grad<double>(a, state); return 0;
#ifdef PNI_EMU_WITH_C10
    case 2: alpha_grad<c10::Half>(a, state); return 0;
    case 3: alpha_grad<c10::BFloat16>(a, state); return 0;
#endif
    default: return 1;
  }
}

int emu_max_pack() { return kMaxPack; }

// 0: the launcher's choice of index type; 32 / 64: force it (64 always valid, 32 only below 2^31).
void emu_set_index_bits(int bits) { g_index_bits = bits; }

// FastDiv<int32_t / int64_t> (bits 32 / 64) of x[i] by d, as the kernels divide, into out.
void emu_fastdiv(int bits, uint64_t d, int count, const int64_t* x, int64_t* out) {
  uint64_t magic = 0;
  int shift = 0;
  fastdiv_magic(d, magic, shift);
  for (int i = 0; i < count; ++i) {
    out[i] = bits == 32 ? FastDiv<int32_t>(magic, shift).div(static_cast<int32_t>(x[i]))
                        : FastDiv<int64_t>(magic, shift).div(x[i]);
  }
}

// Stage-2 planning of one tensor (n, n_alpha, inner): 1 when a block sums each alpha index.
int emu_stage2_block(int64_t n, int64_t n_alpha, int64_t inner) {
  Desc d{};
  d.n = n;
  d.n_alpha = n_alpha;
  plan_alpha_grad(d, inner, 0);
  return (d.flags & kStage2Block) ? 1 : 0;
}

}  // extern "C"
