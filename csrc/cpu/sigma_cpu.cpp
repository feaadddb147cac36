// CPU kernel of pni_fast::sigma: the unbiased std of all elements of v, the
// "sigma" of PNI (schema in csrc/ops.cpp).
//
// Definition (the pure-PyTorch path computes the same thing):
//   * float32 / float16 / bfloat16: the two-pass unbiased std computed in float64
//     (mean = sum(x) / n, then sum((x - mean)^2) / (n - 1), sqrt), rounded once to
//     float32. In float64 neither pass can overflow or lose a square to underflow for
//     finite inputs of these dtypes, so every finite tensor gets a finite answer.
//   * float64: the same two passes on x * 2^-k, where 2^k <= max|x| < 2^(k+1) (k clamped
//     to [-1022, 1022] so 2^-k is a normal number), and the result times 2^k. Scaling by a power of two is exact, so this equals the plain
//     two-pass float64 std whenever that one neither overflows nor underflows, and
//     stays correct for values beyond 1e154 (whose squares overflow) or below 1e-154.
//   * fewer than 2 elements: 0; a NaN or an infinity anywhere: NaN (like torch.std).
// Deterministic: fixed-size items of kItemElems elements are summed in parallel
// (16 float64 lanes per 256-element block, lanes and blocks added in a fixed order)
// and the item sums are added in item order, so the bits do not depend on the number
// of threads.
//
// sigma_multi(vs): the same values for a list of tensors (one dtype) in one call: the
// items of all tensors share one parallel loop per pass, and each tensor's item sums are
// combined exactly as for the tensor alone, so element t is bit-for-bit sigma(vs[t]).
// (sigma itself is sigma_multi of one tensor.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "isa.h"
#include "normal_block.h"

namespace pni_fast {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kSumBlock = 256;          // elements per lane block (and fp16 conversion buffer)
constexpr int64_t kItemElems = 16 * 1024;   // elements per parallel item (a multiple of kSumBlock)
constexpr int kLanes = 16;

// Sum over one block (len <= kSumBlock) of f(x) in kLanes float64 lanes, where f is
// x * scale (kSquares false) or (x * scale - mean)^2 (kSquares true). The lanes fix the
// association, so every ISA variant below returns the same bits.
template <bool kSquares, typename T>
PNI_ALWAYS_INLINE double block_sum(const T* PNI_RESTRICT x, int64_t len, double scale, double mean) {
  double lane[kLanes] = {};
  auto f = [scale, mean](double a) {
    const double d = a * scale - mean;
    return kSquares ? d * d : d;
  };
  int64_t t = 0;
  for (; t + kLanes <= len; t += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lane[l] += f(static_cast<double>(x[t + l]));
    }
  }
  for (int l = 0; t < len; ++t, ++l) {
    lane[l] += f(static_cast<double>(x[t]));
  }
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    s += lane[l];
  }
  return s;
}

template <bool kSquares, typename T>
double block_sum_generic(const T* x, int64_t len, double scale, double mean) {
  return block_sum<kSquares>(x, len, scale, mean);
}

#if PNI_X86_DISPATCH
template <bool kSquares, typename T>
PNI_TARGET_AVX2 double block_sum_avx2(const T* x, int64_t len, double scale, double mean) {
  return block_sum<kSquares>(x, len, scale, mean);
}

template <bool kSquares, typename T>
PNI_TARGET_AVX512 double block_sum_avx512(const T* x, int64_t len, double scale, double mean) {
  return block_sum<kSquares>(x, len, scale, mean);
}
#endif

// The block sum of the SIMD variant the noise kernels use (float or double input).
template <bool kSquares, typename T>
auto pick_block_sum() -> double (*)(const T*, int64_t, double, double) {
#if PNI_X86_DISPATCH
  const std::string isa = normal_block_isa();
  if (isa == "avx512") {
    return &block_sum_avx512<kSquares, T>;
  }
  if (isa == "avx2") {
    return &block_sum_avx2<kSquares, T>;
  }
#endif
  return &block_sum_generic<kSquares, T>;
}

// One work item: elements [lo, hi) of tensor t (items never straddle two tensors; their
// boundaries depend only on the tensors' sizes).
struct Item {
  int64_t t, lo, hi;
};

// Sum of f(x) (see block_sum) over elements [lo, hi) of x: kSumBlock blocks added in order.
// float16 / bfloat16 blocks are converted to float32 first (exact).
template <bool kSquares, typename scalar_t, typename SumFn>
double item_sum(const scalar_t* x, int64_t lo, int64_t hi, double scale, double mean, SumFn sum_fn) {
  double s = 0.0;
  for (int64_t b = lo; b < hi; b += kSumBlock) {
    const int64_t len = std::min<int64_t>(kSumBlock, hi - b);
    if constexpr (std::is_same_v<scalar_t, at::Half>) {
      alignas(64) float buf[kSumBlock];  // F16C conversion of the block
      half_to_float(reinterpret_cast<const uint16_t*>(x + b), buf, len);
      s += sum_fn(buf, len, scale, mean);
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      alignas(64) float buf[kSumBlock];
      for (int64_t t = 0; t < len; ++t) {
        buf[t] = static_cast<float>(x[b + t]);
      }
      s += sum_fn(buf, len, scale, mean);
    } else {
      s += sum_fn(x + b, len, scale, mean);
    }
  }
  return s;
}

// max |x| over [lo, hi), ignoring NaN (the sums turn a NaN into a NaN result).
double item_abs_max(const double* x, int64_t lo, int64_t hi) {
  double m = 0.0;
  for (int64_t t = lo; t < hi; ++t) {
    const double a = std::abs(x[t]);
    m = a > m ? a : m;
  }
  return m;
}

// part[i] = f(items[i]) for every item, in parallel; the values do not depend on the thread count.
template <typename F>
void for_each_item(const std::vector<Item>& items, int64_t total_elems, std::vector<double>& part, const F& f) {
  // small workloads stay on the calling thread (an OpenMP region costs more than the sums)
  const int64_t grain = total_elems < kItemElems ? static_cast<int64_t>(items.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(items.size()), std::max<int64_t>(grain, 1), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      part[static_cast<size_t>(i)] = f(items[static_cast<size_t>(i)]);
    }
  });
}

// The sigma definition (top of the file) of every tensor xs[t] (ns[t] elements, contiguous),
// as a float64 value before the final rounding, into res[t]. All tensors' items run in one
// parallel loop per pass; each tensor's item results are combined in item order, exactly as
// for a tensor alone, so sigma_multi gives the bits of sigma on every tensor.
template <typename scalar_t>
void sigmas_of(const std::vector<const scalar_t*>& xs, const std::vector<int64_t>& ns, std::vector<double>& res) {
  using in_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kScaled = std::is_same_v<scalar_t, double>;
  const size_t count = xs.size();
  res.assign(count, 0.0);
  std::vector<Item> items;
  std::vector<size_t> first(count + 1, 0);  // items of tensor t: first[t] .. first[t + 1]
  int64_t total = 0;
  for (size_t t = 0; t < count; ++t) {
    first[t] = items.size();
    if (ns[t] >= 2) {  // fewer than 2 elements: sigma 0
      for (int64_t lo = 0; lo < ns[t]; lo += kItemElems) {
        items.push_back({static_cast<int64_t>(t), lo, std::min(ns[t], lo + kItemElems)});
      }
      total += ns[t];
    }
  }
  first[count] = items.size();
  if (items.empty()) {
    return;
  }
  std::vector<double> part(items.size(), 0.0), scale(count, 1.0), mean(count, 0.0);
  std::vector<int> k(count, 0);
  std::vector<char> skip(count, 0);  // an infinity (float64): NaN without the sums
  // per tensor: the sum of its item results in item order, starting from 0.0
  auto combine = [&](size_t t) {
    double s = 0.0;
    for (size_t i = first[t]; i < first[t + 1]; ++i) {
      s += part[i];
    }
    return s;
  };
  if constexpr (kScaled) {
    for_each_item(items, total, part, [&](const Item& it) { return item_abs_max(xs[it.t], it.lo, it.hi); });
    for (size_t t = 0; t < count; ++t) {
      double amax = 0.0;
      for (size_t i = first[t]; i < first[t + 1]; ++i) {
        amax = std::max(amax, part[i]);
      }
      if (std::isinf(amax)) {
        skip[t] = 1;
      } else if (amax > 0.0) {
        // 2^k <= amax < 2^(k+1); k is clamped so that the scale 2^-k is a normal number (a
        // subnormal scale would read as 0 with flush-to-zero / denormals-are-zero on), which
        // leaves |x * 2^-k| < 4 at the top and moves subnormal inputs up by 2^1022
        k[t] = std::min(1022, std::max(-1022, std::ilogb(amax)));
        scale[t] = std::ldexp(1.0, -k[t]);
      }  // all zeros (or NaN-only, which the sums turn into NaN): unscaled
    }
  }
  const auto sum_fn = pick_block_sum<false, in_t>();
  for_each_item(items, total, part, [&](const Item& it) {
    return skip[it.t] ? 0.0 : item_sum<false>(xs[it.t], it.lo, it.hi, scale[it.t], 0.0, sum_fn);
  });
  for (size_t t = 0; t < count; ++t) {
    mean[t] = ns[t] >= 2 ? combine(t) / static_cast<double>(ns[t]) : 0.0;
  }
  const auto sq_fn = pick_block_sum<true, in_t>();
  for_each_item(items, total, part, [&](const Item& it) {
    return skip[it.t] ? 0.0 : item_sum<true>(xs[it.t], it.lo, it.hi, scale[it.t], mean[it.t], sq_fn);
  });
  for (size_t t = 0; t < count; ++t) {
    if (ns[t] < 2) {
      continue;
    }
    if (skip[t]) {
      res[t] = std::numeric_limits<double>::quiet_NaN();  // an infinity: NaN like torch.std
      continue;
    }
    const double sd = std::sqrt(combine(t) / static_cast<double>(ns[t] - 1));
    res[t] = kScaled ? std::ldexp(sd, k[t]) : sd;
  }
}

// res (float64 values) into a float32 tensor (one rounding each), or float64 for float64 inputs.
Tensor sigma_values(at::TensorList vs, const std::vector<Tensor>& contig) {
  const at::ScalarType st = vs[0].scalar_type();
  std::vector<double> res;
  std::vector<int64_t> ns;
  for (const Tensor& c : contig) {
    ns.push_back(c.numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "pni_fast_sigma_cpu", [&] {
    std::vector<const scalar_t*> xs;
    for (const Tensor& c : contig) {
      xs.push_back(c.numel() >= 2 ? c.const_data_ptr<scalar_t>() : nullptr);
    }
    sigmas_of<scalar_t>(xs, ns, res);
  });
  const int64_t count = static_cast<int64_t>(res.size());
  if (st == at::kDouble) {
    Tensor out = at::empty({count}, vs[0].options().dtype(at::kDouble));
    std::copy(res.begin(), res.end(), out.data_ptr<double>());
    return out;
  }
  Tensor out = at::empty({count}, vs[0].options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < count; ++t) {
    o[t] = static_cast<float>(res[static_cast<size_t>(t)]);  // the one rounding to float32
  }
  return out;
}

Tensor sigma_cpu(const Tensor& v_in) {
  TORCH_CHECK(is_supported_float(v_in.scalar_type()),
              "v must be float32, float64, float16 or bfloat16, got ", v_in.scalar_type());
  return sigma_values({v_in}, {v_in.contiguous()}).reshape({});
}

Tensor sigma_multi_cpu(at::TensorList vs) {
  check_sigma_multi(vs, /*need_cuda=*/false);
  std::vector<Tensor> contig;
  for (size_t i = 0; i < vs.size(); ++i) {
    TORCH_CHECK(vs[i].device().is_cpu(), "sigma_multi: vs[", i, "] must be a CPU tensor, got ", vs[i].device());
    contig.push_back(vs[i].contiguous());
  }
  return sigma_values(vs, contig);
}

Tensor sigma_meta(const Tensor& v) {
  return at::empty({}, v.options().dtype(v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

Tensor sigma_multi_meta(at::TensorList vs) {
  check_sigma_multi(vs, /*need_cuda=*/false);
  return at::empty({static_cast<int64_t>(vs.size())},
                   vs[0].options().dtype(vs[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CPU, m) {
  m.impl("sigma", &sigma_cpu);
  m.impl("sigma_multi", &sigma_multi_cpu);
}

// Shape functions of sigma and sigma_multi for torch.compile / FakeTensor (the other ops
// get theirs from Python, pni_fast/backends/cpp.py).
TORCH_LIBRARY_IMPL(pni_fast, Meta, m) {
  m.impl("sigma", &sigma_meta);
  m.impl("sigma_multi", &sigma_multi_meta);
}

}  // namespace cpu
}  // namespace pni_fast
