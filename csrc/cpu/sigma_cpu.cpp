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

// Sum over the tensor of f(x) (see block_sum) in float64, same bits for any thread count.
// float16 / bfloat16 blocks are converted to float32 first (exact).
template <bool kSquares, typename scalar_t>
double deterministic_sum(const scalar_t* x, int64_t n, double scale, double mean) {
  using in_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto sum_fn = pick_block_sum<kSquares, in_t>();
  const int64_t nitems = (n + kItemElems - 1) / kItemElems;
  std::vector<double> part(static_cast<size_t>(nitems), 0.0);
  at::parallel_for(0, nitems, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t lo = i * kItemElems;
      const int64_t hi = std::min(n, lo + kItemElems);
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
      part[static_cast<size_t>(i)] = s;
    }
  });
  double total = 0.0;
  for (double s : part) {
    total += s;
  }
  return total;
}

// max |x| of a float64 tensor, ignoring NaN (the sums turn a NaN into a NaN result).
double abs_max(const double* x, int64_t n) {
  const int64_t nitems = (n + kItemElems - 1) / kItemElems;
  std::vector<double> part(static_cast<size_t>(nitems), 0.0);
  at::parallel_for(0, nitems, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t hi = std::min(n, (i + 1) * kItemElems);
      double m = 0.0;
      for (int64_t t = i * kItemElems; t < hi; ++t) {
        const double a = std::abs(x[t]);
        m = a > m ? a : m;
      }
      part[static_cast<size_t>(i)] = m;
    }
  });
  return *std::max_element(part.begin(), part.end());
}

// Two-pass unbiased std of x * scale (scale a power of two), in float64.
template <typename scalar_t>
double two_pass_std(const scalar_t* x, int64_t n, double scale) {
  const double mean = deterministic_sum<false>(x, n, scale, 0.0) / static_cast<double>(n);
  const double ss = deterministic_sum<true>(x, n, scale, mean);
  return std::sqrt(ss / static_cast<double>(n - 1));
}

double float64_std(const double* x, int64_t n) {
  const double amax = abs_max(x, n);
  if (!(amax > 0.0) || std::isinf(amax)) {
    // all zeros (or NaN-only, which the sums turn into NaN); an infinity: NaN like torch.std
    return std::isinf(amax) ? std::numeric_limits<double>::quiet_NaN() : two_pass_std(x, n, 1.0);
  }
  // 2^k <= amax < 2^(k+1); k is clamped so that the scale 2^-k is a normal number (a
  // subnormal scale would read as 0 with flush-to-zero / denormals-are-zero on), which
  // leaves |x * 2^-k| < 4 at the top and moves subnormal inputs up by 2^1022
  const int k = std::min(1022, std::max(-1022, std::ilogb(amax)));
  return std::ldexp(two_pass_std(x, n, std::ldexp(1.0, -k)), k);
}

// float32 / float16 / bfloat16: float64 two-pass needs no scaling (see the top of the file)
template <typename scalar_t>
double unbiased_std(const scalar_t* x, int64_t n) {
  return two_pass_std(x, n, 1.0);
}

double unbiased_std(const double* x, int64_t n) { return float64_std(x, n); }

Tensor sigma_cpu(const Tensor& v_in) {
  TORCH_CHECK(is_supported_float(v_in.scalar_type()),
              "v must be float32, float64, float16 or bfloat16, got ", v_in.scalar_type());
  const Tensor v = v_in.contiguous();
  const int64_t n = v.numel();
  const bool is_double = v.scalar_type() == at::kDouble;
  Tensor out = at::empty({}, v.options().dtype(is_double ? at::kDouble : at::kFloat));
  double result = 0.0;
  if (n >= 2) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "pni_fast_sigma_cpu", [&] {
      result = unbiased_std(v.const_data_ptr<scalar_t>(), n);
    });
  }
  if (is_double) {
    out.fill_(result);
  } else {
    out.fill_(static_cast<float>(result));  // the one rounding to float32
  }
  return out;
}

Tensor sigma_meta(const Tensor& v) {
  return at::empty({}, v.options().dtype(v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CPU, m) { m.impl("sigma", &sigma_cpu); }

// Shape function of sigma for torch.compile / FakeTensor (the other ops get
// theirs from Python, pni_fast/functional.py).
TORCH_LIBRARY_IMPL(pni_fast, Meta, m) { m.impl("sigma", &sigma_meta); }

}  // namespace cpu
}  // namespace pni_fast
