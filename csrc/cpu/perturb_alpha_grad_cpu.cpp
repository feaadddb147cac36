// CPU kernel of perturb's alpha gradient (perturb_alpha_grad and its list
// version; the op entry points are in perturb_cpu.cpp, schemas in csrc/ops.cpp).
// The gradient is accumulated in the math dtype (float32, float64 for float64
// tensors) and returned in alpha's.
//
// The same normals as the forward are regenerated (or, for the eager fast
// path's small models, read from the copy its forward stored) and reduced. The work is
// cut into items whose boundaries depend only on the tensor's shape, each
// item writes its own partial sums, and the partials are added in item
// order, so the result has the same bits for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "normal_block.h"
#include "perturb_cpu.h"

namespace pni_fast {
namespace cpu {

using at::Tensor;

namespace {

// Elements per reduction item (a multiple of kBlockElems).
constexpr int64_t kItemElems = 16 * 1024;
// Runs of constant alpha index shorter than this use the column strategy.
constexpr int64_t kMinRowInner = 64;
// Alpha indices per column tile (column strategy).
constexpr int64_t kTileTarget = 4096;
// Reduction items the column strategy aims for (a constant, not the thread count).
constexpr int64_t kColumnItems = 64;

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
// window, whose placement depends only on e_begin. The normals are
// regenerated, or read from the forward's stored copy: the same pieces either
// way, so the two give the same bits.
template <typename Fn>
void walk_normals(const NoiseSource& src, int64_t e_begin, int64_t e_end, float* zbuf, Fn&& fn) {
  int64_t e = e_begin;
  while (e < e_end) {
    const int64_t q = e / 4;
    const int64_t shift = e % 4;
    const int64_t len = std::min<int64_t>(e_end - e, kBlockElems - shift);
    if (src.stored != nullptr) {
      fn(e, src.stored + e, len);
    } else {
      normal_block(src.seed, src.offset + static_cast<uint64_t>(q), zbuf);
      fn(e, zbuf + shift, len);
    }
    e += len;
  }
}

// Row strategy: runs of `inner` >= kMinRowInner elements (or the whole tensor
// when alpha has one element). Items are fixed 16K-element ranges; each item
// stores one partial per run it touches.
template <typename scalar_t, typename acc_t>
void alpha_grad_rows(const scalar_t* g, int64_t n, int64_t na, int64_t inner, const NoiseSource& src, acc_t* gsum) {
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
      walk_normals(src, lo, hi, zbuf, [&](int64_t e, const float* z, int64_t len) {
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
void alpha_grad_columns(const scalar_t* g, int64_t n, int64_t na, int64_t inner, const NoiseSource& src,
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
        walk_normals(src, r0 * width, r1 * width, zbuf, consume);
      } else {
        for (int64_t r = r0; r < r1; ++r) {
          walk_normals(src, r * width + k0 * inner, r * width + k1 * inner, zbuf, consume);
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

}  // namespace

// Alpha gradient of checked arguments; (seed, offset) already include rng_state. `stored`: the
// forward's noise (perturb_impl's zout) for these counters, or nullptr to regenerate it.
// The sums are taken in the accumulation dtype (float32, float64 for float64), times sigma in that
// dtype, then rounded once to alpha's dtype: written straight into the result, no ATen op per
// call beyond its allocation (the eager fast path calls this for every layer of a model).
Tensor alpha_grad_impl(const Tensor& grad_in, const Tensor& alpha, double sigma, uint64_t useed, uint64_t uoffset,
                       int64_t inner, const float* stored) {
  const Tensor grad = grad_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t na = alpha.numel();
  Tensor out = at::empty(alpha.sizes(), alpha.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) {
    return out.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pni_fast_alpha_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool direct = alpha.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
    std::vector<acc_t> buf(direct ? 0 : static_cast<size_t>(na));
    acc_t* gsum = direct ? out.mutable_data_ptr<acc_t>() : buf.data();
    std::fill(gsum, gsum + na, acc_t(0));
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const NoiseSource src{useed, uoffset, stored};
    if (na == 1) {
      alpha_grad_rows<scalar_t, acc_t>(gp, n, 1, n, src, gsum);
    } else if (inner >= kMinRowInner) {
      alpha_grad_rows<scalar_t, acc_t>(gp, n, na, inner, src, gsum);
    } else {
      alpha_grad_columns<scalar_t, acc_t>(gp, n, na, inner, src, gsum);
    }
    const acc_t s = static_cast<acc_t>(sigma);  // exact: sigma is float32 or this dtype
    for (int64_t k = 0; k < na; ++k) {
      gsum[k] *= s;
    }
    if (!direct) {  // a float32 gradient into a float16 / bfloat16 alpha: one rounding
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, alpha.scalar_type(), "pni_fast_alpha_grad_out", [&] {
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        for (int64_t k = 0; k < na; ++k) {
          o[k] = static_cast<scalar_t>(gsum[k]);
        }
      });
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace pni_fast
