// CPU kernels of perturb, perturb_alpha_grad and their list versions (schemas
// in csrc/ops.cpp; the RNG ops are in rng_cpu.cpp, sigma in sigma_cpu.cpp).
// alpha is converted to the math dtype first (float32, float64 for float64
// tensors), so a float32 alpha with float16/bfloat16 tensors needs no other code;
// the alpha gradient is accumulated in that dtype and returned in alpha's.
//
// Forward: blocks of 256 elements; each block draws its 256 normals with
// normal_block() (vectorized Philox + Box-Muller) into an L1 buffer and
// applies out = v + (alpha * sigma) * z in the same pass, so the noise never
// reaches memory. Threads split the tensor on block boundaries.
//
// Alpha gradient: the same normals are regenerated and reduced. The work is
// cut into items whose boundaries depend only on the tensor's shape, each
// item writes its own partial sums, and the partials are added in item
// order, so the result has the same bits for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "normal_block.h"
#include "rng_state.h"

namespace pni_fast {
namespace cpu {
namespace {

using at::Tensor;

// Blocks per parallel chunk in the elementwise ops: 64 blocks = 16K elements,
// so small tensors run inline with no thread hand-off.
constexpr int64_t kGrainBlocks = 64;
// Elements per reduction item in the alpha gradient (a multiple of kBlockElems).
constexpr int64_t kItemElems = 16 * 1024;
// Runs of constant alpha index shorter than this use the column strategy.
constexpr int64_t kMinRowInner = 64;
// Alpha indices per column tile (column strategy).
constexpr int64_t kTileTarget = 4096;
// Reduction items the column strategy aims for (a constant, not the thread count).
constexpr int64_t kColumnItems = 64;

template <typename T>
T read_scalar(const Tensor& t) {
  return t.item().to<T>();
}

// ---------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------

// out[t] = v[t] + (alpha[b(e0 + t)] * s) * z[t] for t < len (alpha already in opmath_t).
template <typename scalar_t, typename opmath_t>
void apply_block(const scalar_t* PNI_RESTRICT v, const opmath_t* PNI_RESTRICT alpha, opmath_t s,
                 const float* PNI_RESTRICT z, scalar_t* PNI_RESTRICT out, int64_t e0, int64_t len, int64_t na,
                 int64_t inner) {
  if (na == 1) {
    const opmath_t c = static_cast<opmath_t>(alpha[0]) * s;
    for (int64_t t = 0; t < len; ++t) {
      out[t] = static_cast<scalar_t>(static_cast<opmath_t>(v[t]) + c * static_cast<opmath_t>(z[t]));
    }
    return;
  }
  int64_t t = 0;
  while (t < len) {
    const int64_t e = e0 + t;
    const int64_t run_index = e / inner;
    const int64_t k = run_index % na;
    if (inner == 1) {
      // consecutive elements use consecutive alpha entries up to the wrap
      const int64_t run = std::min(len - t, na - k);
      const opmath_t* PNI_RESTRICT a = alpha + k;
      for (int64_t u = 0; u < run; ++u) {
        const opmath_t c = static_cast<opmath_t>(a[u]) * s;
        out[t + u] = static_cast<scalar_t>(static_cast<opmath_t>(v[t + u]) + c * static_cast<opmath_t>(z[t + u]));
      }
      t += run;
    } else {
      const int64_t run = std::min(len - t, (run_index + 1) * inner - e);
      const opmath_t c = static_cast<opmath_t>(alpha[k]) * s;
      for (int64_t u = 0; u < run; ++u) {
        out[t + u] = static_cast<scalar_t>(static_cast<opmath_t>(v[t + u]) + c * static_cast<opmath_t>(z[t + u]));
      }
      t += run;
    }
  }
}

// float16: blocks converted with F16C (when present) to fp32 and back; same
// values as the generic path (fp32 math, round-to-nearest-even result).
void perturb_half(const Tensor& v, const Tensor& alpha_f, const Tensor& sigma, uint64_t seed, uint64_t offset,
                  int64_t inner_eff, Tensor& out) {
  const float s = read_scalar<float>(sigma);
  const int64_t n = v.numel();
  const int64_t na = alpha_f.numel();
  const int64_t nblocks = (n + kBlockElems - 1) / kBlockElems;
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.const_data_ptr<at::Half>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::Half>());
  const float* ap = alpha_f.const_data_ptr<float>();
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kBlockElems];
    alignas(64) float vb[kBlockElems];
    alignas(64) float ob[kBlockElems];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kBlockElems;
      const int64_t len = std::min<int64_t>(kBlockElems, n - e0);
      half_to_float(vp + e0, vb, len);
      normal_block(seed, offset + static_cast<uint64_t>(b) * kBlockQuads, z);
      apply_block<float, float>(vb, ap, s, z, ob, e0, len, na, inner_eff);
      float_to_half(ob, op + e0, len);
    }
  });
}

// Forward of checked arguments; (seed, offset) already include rng_state.
Tensor perturb_impl(const Tensor& v_in, const Tensor& alpha_in, const Tensor& sigma, uint64_t useed,
                    uint64_t uoffset, int64_t inner) {
  const Tensor v = v_in.contiguous();
  Tensor out = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = v.numel();
  if (n == 0) {
    return out;
  }
  // alpha in the math dtype (float32, float64 for float64): exact for every accepted alpha dtype
  const Tensor alpha = alpha_in.to(opmath_dtype(v.scalar_type())).contiguous();
  const int64_t na = alpha.numel();
  const int64_t inner_eff = na == 1 ? n : inner;
  const int64_t nblocks = (n + kBlockElems - 1) / kBlockElems;
  if (v.scalar_type() == at::kHalf) {
    perturb_half(v, alpha, sigma, useed, uoffset, inner_eff, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "pni_fast_perturb_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t s = read_scalar<opmath_t>(sigma);
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const opmath_t* ap = alpha.const_data_ptr<opmath_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
      alignas(64) float z[kBlockElems];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t e0 = b * kBlockElems;
        const int64_t len = std::min<int64_t>(kBlockElems, n - e0);
        normal_block(useed, uoffset + static_cast<uint64_t>(b) * kBlockQuads, z);
        apply_block<scalar_t, opmath_t>(vp + e0, ap, s, z, op + e0, e0, len, na, inner_eff);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// alpha gradient
// ---------------------------------------------------------------------------

// sum_t g[t] * z[t] with 8 explicit lanes: the association is fixed by the
// code, so the compiler's vector width cannot change the bits.
template <typename scalar_t, typename acc_t>
acc_t dot_lanes(const scalar_t* PNI_RESTRICT g, const float* PNI_RESTRICT z, int64_t len) {
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) {
    for (int l = 0; l < 8; ++l) {
      lane[l] += static_cast<acc_t>(g[t + l]) * static_cast<acc_t>(z[t + l]);
    }
  }
  for (int l = 0; t < len; ++t, ++l) {
    lane[l] += static_cast<acc_t>(g[t]) * static_cast<acc_t>(z[t]);
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Calls fn(e, z_ptr, len) over the element range [e_begin, e_end) with the
// normals of those elements; pieces never cross a 256-element generation
// window, whose placement depends only on e_begin.
template <typename Fn>
void walk_normals(uint64_t seed, uint64_t offset, int64_t e_begin, int64_t e_end, float* zbuf, Fn&& fn) {
  int64_t e = e_begin;
  while (e < e_end) {
    const int64_t q = e / 4;
    const int64_t shift = e % 4;
    const int64_t len = std::min<int64_t>(e_end - e, kBlockElems - shift);
    normal_block(seed, offset + static_cast<uint64_t>(q), zbuf);
    fn(e, zbuf + shift, len);
    e += len;
  }
}

// Row strategy: runs of `inner` >= kMinRowInner elements (or the whole tensor
// when alpha has one element). Items are fixed 16K-element ranges; each item
// stores one partial per run it touches.
template <typename scalar_t, typename acc_t>
void alpha_grad_rows(const scalar_t* g, int64_t n, int64_t na, int64_t inner, uint64_t seed, uint64_t offset,
                     acc_t* gsum) {
  const int64_t nitems = (n + kItemElems - 1) / kItemElems;
  std::vector<int64_t> first_run(nitems), slot(nitems + 1, 0);
  for (int64_t i = 0; i < nitems; ++i) {
    const int64_t lo = i * kItemElems;
    const int64_t hi = std::min(n, lo + kItemElems) - 1;
    first_run[i] = lo / inner;
    slot[i + 1] = slot[i] + (hi / inner - lo / inner + 1);
  }
  std::vector<acc_t> partial(static_cast<size_t>(slot[nitems]), acc_t(0));
  at::parallel_for(0, nitems, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float zbuf[kBlockElems];
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* part = partial.data() + slot[i];
      const int64_t base_run = first_run[i];
      const int64_t lo = i * kItemElems;
      const int64_t hi = std::min(n, lo + kItemElems);
      walk_normals(seed, offset, lo, hi, zbuf, [&](int64_t e, const float* z, int64_t len) {
        auto reduce = [&](const auto* gp) {  // gp[t] is element e + t
          int64_t t = 0;
          while (t < len) {
            const int64_t run = (e + t) / inner;
            const int64_t seg = std::min(len - t, (run + 1) * inner - (e + t));
            part[run - base_run] += dot_lanes<std::remove_cv_t<std::remove_pointer_t<decltype(gp)>>, acc_t>(
                gp + t, z + t, seg);
            t += seg;
          }
        };
        if constexpr (std::is_same_v<scalar_t, at::Half>) {
          alignas(64) float gbuf[kBlockElems];  // F16C conversion of the block
          half_to_float(reinterpret_cast<const uint16_t*>(g + e), gbuf, len);
          reduce(static_cast<const float*>(gbuf));
        } else {
          reduce(g + e);
        }
      });
    }
  });
  // fixed order: items in order, runs in order
  for (int64_t i = 0; i < nitems; ++i) {
    int64_t k = first_run[i] % na;
    for (int64_t r = slot[i]; r < slot[i + 1]; ++r) {
      gsum[k] += partial[static_cast<size_t>(r)];
      k = k + 1 == na ? 0 : k + 1;
    }
  }
}

// Column strategy (alpha has several entries and runs are short): view the
// tensor as [R, W] with W = na * inner. Items are (row group, column tile)
// rectangles chosen from the shape alone; each keeps per-alpha partials for
// its tile, summed over its rows in order; groups are then added in order.
template <typename scalar_t, typename acc_t>
void alpha_grad_columns(const scalar_t* g, int64_t n, int64_t na, int64_t inner, uint64_t seed, uint64_t offset,
                        acc_t* gsum) {
  const int64_t width = na * inner;
  const int64_t rows = n / width;
  const int64_t tile_k = std::max<int64_t>(1, kTileTarget / inner);
  const int64_t ntiles = (na + tile_k - 1) / tile_k;
  int64_t ngroups = std::max<int64_t>(1, (kColumnItems + ntiles - 1) / ntiles);
  const int64_t tile_elems = std::min(na, tile_k) * inner;
  ngroups = std::min(ngroups, std::max<int64_t>(1, rows * tile_elems / (kItemElems / 4)));
  ngroups = std::min(ngroups, rows);
  const int64_t rows_per_group = (rows + ngroups - 1) / ngroups;
  ngroups = (rows + rows_per_group - 1) / rows_per_group;
  // one group: items own disjoint alpha ranges and accumulate straight into gsum
  std::vector<acc_t> partial(ngroups > 1 ? static_cast<size_t>(ngroups * na) : 0, acc_t(0));
  acc_t* partial_base = ngroups > 1 ? partial.data() : gsum;

  at::parallel_for(0, ngroups * ntiles, 1, [&](int64_t it0, int64_t it1) {
    alignas(64) float zbuf[kBlockElems];
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t grp = it / ntiles;
      const int64_t tile = it % ntiles;
      const int64_t k0 = tile * tile_k;
      const int64_t k1 = std::min(na, k0 + tile_k);
      const int64_t r0 = grp * rows_per_group;
      const int64_t r1 = std::min(rows, r0 + rows_per_group);
      acc_t* part = partial_base + grp * na;
      // consume a piece starting at element e (column c of its row)
      auto consume = [&](int64_t e, const float* z, int64_t len) {
        int64_t c = e % width;
        int64_t t = 0;
        while (t < len) {
          const int64_t seg = std::min(len - t, width - c);  // up to the row end
          if (inner == 1) {
            acc_t* PNI_RESTRICT p = part + c;
            const scalar_t* PNI_RESTRICT gg = g + e + t;
            const float* PNI_RESTRICT zz = z + t;
            for (int64_t u = 0; u < seg; ++u) {
              p[u] += static_cast<acc_t>(gg[u]) * static_cast<acc_t>(zz[u]);
            }
          } else {
            // pieces of constant alpha index (a run of `inner` columns, or part of one)
            int64_t u = 0;
            while (u < seg) {
              const int64_t k = (c + u) / inner;
              const int64_t piece = std::min(seg - u, (k + 1) * inner - (c + u));
              part[k] += dot_lanes<scalar_t, acc_t>(g + e + t + u, z + t + u, piece);
              u += piece;
            }
          }
          t += seg;
          c = 0;
        }
      };
      if (ntiles == 1) {
        walk_normals(seed, offset, r0 * width, r1 * width, zbuf, consume);
      } else {
        for (int64_t r = r0; r < r1; ++r) {
          walk_normals(seed, offset, r * width + k0 * inner, r * width + k1 * inner, zbuf, consume);
        }
      }
    }
  });
  if (ngroups == 1) {
    return;
  }
  // groups in order for every k (k innermost so the loop vectorizes)
  at::parallel_for(0, na, 4096, [&](int64_t ka, int64_t kb) {
    acc_t* PNI_RESTRICT out = gsum;
    for (int64_t grp = 0; grp < ngroups; ++grp) {
      const acc_t* PNI_RESTRICT p = partial.data() + grp * na;
      for (int64_t k = ka; k < kb; ++k) {
        out[k] += p[k];
      }
    }
  });
}

// Alpha gradient of checked arguments; (seed, offset) already include rng_state.
Tensor alpha_grad_impl(const Tensor& grad_in, const Tensor& alpha, const Tensor& sigma, uint64_t useed,
                       uint64_t uoffset, int64_t inner) {
  const Tensor grad = grad_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t na = alpha.numel();
  if (n == 0) {
    return at::zeros(alpha.sizes(), alpha.options().memory_format(at::MemoryFormat::Contiguous));
  }
  // sums of grad * z per alpha entry, in fp32 (fp64 for float64)
  const at::ScalarType acc_type = opmath_dtype(grad.scalar_type());
  Tensor acc = at::zeros({na}, grad.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pni_fast_alpha_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    acc_t* gsum = acc.mutable_data_ptr<acc_t>();
    if (na == 1) {
      alpha_grad_rows<scalar_t, acc_t>(gp, n, 1, n, useed, uoffset, gsum);
    } else if (inner >= kMinRowInner) {
      alpha_grad_rows<scalar_t, acc_t>(gp, n, na, inner, useed, uoffset, gsum);
    } else {
      alpha_grad_columns<scalar_t, acc_t>(gp, n, na, inner, useed, uoffset, gsum);
    }
  });
  // times sigma (in the accumulation dtype), then alpha's dtype (float32 alpha: no rounding
  // to 16 bits, so no overflow) and shape
  acc.mul_(sigma.to(acc_type));
  return acc.to(alpha.scalar_type()).reshape(alpha.sizes());
}

// ---------------------------------------------------------------------------
// op entry points
// ---------------------------------------------------------------------------

using Impl = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, uint64_t, uint64_t, int64_t);

// perturb / perturb_alpha_grad: checks, rng_state, then `impl`.
Tensor single_op(Impl impl, const char* op, const char* vname, const Tensor& v, const Tensor& alpha,
                 const Tensor& sigma, int64_t seed, int64_t offset, int64_t inner,
                 const std::optional<Tensor>& rng_state) {
  check_perturb_args(v, alpha, sigma, seed, offset, inner, vname);
  const RngBase r = rng_base(rng_state, seed, op);
  return impl(v, alpha, sigma, r.seed, first_counter(r, offset, v.numel()), inner);
}

// perturb_multi / perturb_alpha_grad_multi: every tensor checked before any work.
std::vector<Tensor> multi_op(Impl impl, const char* op, const char* list, const char* vname, at::TensorList vs,
                             at::TensorList alphas, at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets,
                             at::IntArrayRef inners, const std::optional<Tensor>& rng_state) {
  check_multi_lengths(op, list, vs.size(), alphas.size(), sigmas.size(), offsets.size(), inners.size());
  const RngBase r = rng_base(rng_state, seed, op);
  std::vector<uint64_t> ctr(vs.size());
  for (size_t i = 0; i < vs.size(); ++i) {
    const std::string prefix = list_prefix(list, i);
    check_perturb_args(vs[i], alphas[i], sigmas[i], seed, offsets[i], inners[i], vname, prefix);
    ctr[i] = first_counter(r, offsets[i], vs[i].numel(), prefix);
  }
  std::vector<Tensor> outs;
  outs.reserve(vs.size());
  for (size_t i = 0; i < vs.size(); ++i) {
    outs.push_back(impl(vs[i], alphas[i], sigmas[i], r.seed, ctr[i], inners[i]));
  }
  return outs;
}

Tensor perturb_cpu(const Tensor& v, const Tensor& alpha, const Tensor& sigma, int64_t seed, int64_t offset,
                   int64_t inner, const std::optional<Tensor>& rng_state) {
  return single_op(&perturb_impl, "perturb", "v", v, alpha, sigma, seed, offset, inner, rng_state);
}

Tensor perturb_alpha_grad_cpu(const Tensor& grad, const Tensor& alpha, const Tensor& sigma, int64_t seed,
                              int64_t offset, int64_t inner, const std::optional<Tensor>& rng_state) {
  return single_op(&alpha_grad_impl, "perturb_alpha_grad", "grad", grad, alpha, sigma, seed, offset, inner,
                   rng_state);
}

std::vector<Tensor> perturb_multi_cpu(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas, int64_t seed,
                                      at::IntArrayRef offsets, at::IntArrayRef inners,
                                      const std::optional<Tensor>& rng_state) {
  return multi_op(&perturb_impl, "perturb_multi", "vs", "v", vs, alphas, sigmas, seed, offsets, inners, rng_state);
}

std::vector<Tensor> perturb_alpha_grad_multi_cpu(at::TensorList grads, at::TensorList alphas, at::TensorList sigmas,
                                                 int64_t seed, at::IntArrayRef offsets, at::IntArrayRef inners,
                                                 const std::optional<Tensor>& rng_state) {
  return multi_op(&alpha_grad_impl, "perturb_alpha_grad_multi", "grads", "grad", grads, alphas, sigmas, seed, offsets,
                  inners, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CPU, m) {
  m.impl("perturb", &perturb_cpu);
  m.impl("perturb_alpha_grad", &perturb_alpha_grad_cpu);
  m.impl("perturb_multi", &perturb_multi_cpu);
  m.impl("perturb_alpha_grad_multi", &perturb_alpha_grad_multi_cpu);
}

}  // namespace cpu
}  // namespace pni_fast
