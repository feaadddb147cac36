// CUDA kernels of the pni_fast ops (schemas in csrc/ops.cpp), registered for
// the CUDA dispatch key.
//
// * Noise comes from csrc/philox.h: each thread turns one Philox call into the
//   4 normals of 4 consecutive elements (element i uses counter offset + i/4,
//   output i%4), so no noise tensor is ever stored.
// * perturb: out = v + alpha[(i/inner) % n_alpha] * sigma * z_i in one pass,
//   vector loads/stores of 4 elements (float4 / 2x double2 / 4x16 bit) when
//   aligned, grid-stride over tiles of kThreads quads.
// * perturb_alpha_grad: deterministic two-stage reduction, no float atomics.
//   Stage 1 writes one partial per (segment, chunk) - a segment is a run of
//   `inner` elements sharing one alpha index - in a fixed order (lane-sequential
//   sums, then a fixed warp butterfly); stage 2 sums the partials of each alpha
//   index in a fixed order and scales by sigma.
// * sigma and alpha stay on the device (no host sync); the current stream is used.
// * The list ops pass up to kMaxPack tensor descriptors by value as one
//   __grid_constant__ kernel parameter (no host-to-device copy, safe under CUDA
//   graph capture) and process every tensor of a dtype in one launch (chunks of
//   kMaxPack). Single-tensor ops are packs of one, so a list op gives the same
//   bits as the single op on every tensor.
//
// Only accurate logf/cosf/sinf (never --use_fast_math): z must agree with the
// CPU and Triton backends within 2e-6. This file includes c10/cuda headers only
// (no ATen/cuda/CUDAContext.h) so it compile-checks on machines without a GPU
// (design.md section 9).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../philox.h"

namespace pni_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Tensors per launch of a list op: the pack must fit the 4 KiB kernel-parameter limit.
constexpr int kMaxPack = 32;
// Elements per warp task in stage 1 of the alpha gradient.
constexpr int64_t kChunk = 2048;
// Segments shorter than this are summed by one lane each (thread mode).
constexpr int64_t kThreadModeMaxInner = 64;
// Blocks per SM of a grid-stride launch.
constexpr int64_t kBlocksPerSm = 16;

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

// One tensor of a launch.
struct Desc {
  const void* in;     // v (forward) or grad (alpha gradient)
  void* out;          // perturbed output (forward) or alpha gradient
  const void* alpha;  // v's dtype, n_alpha elements
  const void* sigma;  // 0-d, float32 or v's dtype
  int64_t n;
  int64_t n_alpha;
  int64_t inner;      // alpha gradient: effective inner (layerwise: n)
  int64_t offset;     // first Philox counter
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

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int find_desc(const Pack& p, int64_t unit) {
  int t = 0;
  while (t + 1 < p.count && unit >= p.start[t + 1]) ++t;
  return t;
}

template <typename T>
__device__ __forceinline__ acc_t<T> load_sigma(const Desc& d) {
  using A = acc_t<T>;
  if (d.flags & kSigmaFloat) return static_cast<A>(*static_cast<const float*>(d.sigma));
  return static_cast<A>(*static_cast<const T*>(d.sigma));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Elements 4q .. 4q+3 of one tensor: out = v + (alpha * sigma) * z.
template <typename T>
__device__ __forceinline__ void perturb_quad(const Desc& d, int64_t q, uint64_t seed) {
  using A = acc_t<T>;
  const T* v = static_cast<const T*>(d.in);
  T* out = static_cast<T*>(d.out);
  const T* alpha = static_cast<const T*>(d.alpha);
  const int64_t base = 4 * q;
  const NormalQuad z = normal4(static_cast<uint64_t>(d.offset) + static_cast<uint64_t>(q), seed);
  const A s = load_sigma<T>(d);
  A as[4];
  if (d.n_alpha == 1) {
    const A a = static_cast<A>(alpha[0]) * s;
#pragma unroll
    for (int j = 0; j < 4; ++j) as[j] = a;
  } else {
    // alpha index (i / inner) % n_alpha, one 64-bit division per quad
    int64_t k = (base / d.inner) % d.n_alpha;
    int64_t r = base % d.inner;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      as[j] = static_cast<A>(alpha[k]) * s;
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
#pragma unroll
    for (int j = 0; j < 4; ++j) y.v[j] = static_cast<T>(static_cast<A>(x.v[j]) + as[j] * static_cast<A>(z.z[j]));
    *reinterpret_cast<Vec4<T>*>(out + base) = y;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < m) out[base + j] = static_cast<T>(static_cast<A>(v[base + j]) + as[j] * static_cast<A>(z.z[j]));
    }
  }
}

// One unit = one tile of kThreads quads; grid-stride over all tiles of the pack.
template <typename T>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const __grid_constant__ Pack pack, uint64_t seed) {
  const int64_t total = pack.start[pack.count];
  for (int64_t unit = blockIdx.x; unit < total; unit += gridDim.x) {
    const int t = find_desc(pack, unit);
    const Desc& d = pack.d[t];
    const int64_t q = (unit - pack.start[t]) * kThreads + threadIdx.x;
    if (4 * q < d.n) perturb_quad<T>(d, q, seed);
  }
}

// ---------------------------------------------------------------------------
// Alpha gradient
// ---------------------------------------------------------------------------

// Sum of grad_i * z_i over elements [lo, hi) of one tensor, taking quads
// lo/4 + first, + stride, ... (each lane sums its quads in order).
template <typename T>
__device__ __forceinline__ acc_t<T> range_sum(const Desc& d, int64_t lo, int64_t hi, uint64_t seed, int first,
                                              int stride) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(d.in);
  A acc = 0;
  if (hi <= lo) return acc;
  const int64_t q_last = (hi - 1) / 4;
  for (int64_t q = lo / 4 + first; q <= q_last; q += stride) {
    const NormalQuad z = normal4(static_cast<uint64_t>(d.offset) + static_cast<uint64_t>(q), seed);
    const int64_t base = 4 * q;
    if (base >= lo && base + 4 <= hi && (d.flags & kVecIn)) {
      const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(g + base);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc += static_cast<A>(x.v[j]) * static_cast<A>(z.z[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = base + j;
        if (i >= lo && i < hi) acc += static_cast<A>(g[i]) * static_cast<A>(z.z[j]);
      }
    }
  }
  return acc;
}

// Elementwise alpha: grad_alpha_i = grad_i * z_i * sigma for the 4 elements of quad q.
template <typename T>
__device__ __forceinline__ void direct_quad(const Desc& d, int64_t q, uint64_t seed) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(d.in);
  T* out = static_cast<T*>(d.out);
  const A s = load_sigma<T>(d);
  const int64_t base = 4 * q;
  const NormalQuad z = normal4(static_cast<uint64_t>(d.offset) + static_cast<uint64_t>(q), seed);
  const int64_t m = d.n - base;
  if (m >= 4 && (d.flags & kVecIn) && (d.flags & kVecOut)) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(g + base);
    Vec4<T> y;
#pragma unroll
    for (int j = 0; j < 4; ++j) y.v[j] = static_cast<T>(static_cast<A>(x.v[j]) * static_cast<A>(z.z[j]) * s);
    *reinterpret_cast<Vec4<T>*>(out + base) = y;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < m) out[base + j] = static_cast<T>(static_cast<A>(g[base + j]) * static_cast<A>(z.z[j]) * s);
    }
  }
}

// Stage 1: one unit = one warp. Warp mode: the unit is (segment, chunk);
// thread mode: 32 segments, one per lane; direct mode: 32 quads, one per lane.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    alpha_grad_partials_kernel(const __grid_constant__ Pack pack, uint64_t seed, acc_t<T>* __restrict__ part) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t total = pack.start[pack.count];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; unit < total;
       unit += step) {
    const int t = find_desc(pack, unit);
    const Desc& d = pack.d[t];
    const int64_t u = unit - pack.start[t];
    if (d.mode == kDirectMode) {
      const int64_t q = u * kWarpSize + lane;
      if (4 * q < d.n) direct_quad<T>(d, q, seed);
    } else if (d.mode == kThreadMode) {
      const int64_t s = u * kWarpSize + lane;
      if (s < d.segs) {
        const int64_t lo = s * d.inner;
        part[d.part_base + s] = range_sum<T>(d, lo, min64(lo + d.inner, d.n), seed, 0, 1);
      }
    } else {
      const int64_t s = u / d.chunks;
      const int64_t c = u % d.chunks;
      const int64_t seg_end = min64((s + 1) * d.inner, d.n);
      const int64_t lo = s * d.inner + c * kChunk;
      const int64_t hi = min64(lo + kChunk, seg_end);
      const acc_t<T> sum = warp_sum(range_sum<T>(d, lo, hi, seed, lane, kWarpSize));
      if (lane == 0) part[d.part_base + s * d.chunks + c] = sum;
    }
  }
}

// Stage 2: one warp per alpha index k: sigma * sum over rows r and chunks c of
// part[(r * n_alpha + k) * chunks + c], lanes strided in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    alpha_grad_reduce_kernel(const __grid_constant__ Pack pack, const acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t total = pack.start[pack.count];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; unit < total;
       unit += step) {
    const int t = find_desc(pack, unit);
    const Desc& d = pack.d[t];
    const int64_t k = unit - pack.start[t];
    const int64_t rows = d.segs / d.n_alpha;
    const int64_t count = rows * d.chunks;
    const A* p = part + d.part_base;
    A acc = 0;
    for (int64_t e = lane; e < count; e += kWarpSize) {
      const int64_t r = e / d.chunks;
      const int64_t c = e - r * d.chunks;
      acc += p[(r * d.n_alpha + k) * d.chunks + c];
    }
    acc = warp_sum(acc);
    if (lane == 0) static_cast<T*>(d.out)[k] = static_cast<T>(acc * load_sigma<T>(d));
  }
}

// ---------------------------------------------------------------------------
// Raw RNG kernels (noise, words, uniforms): one thread per quad, grid-stride.
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    noise_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t nq = (n + 3) / 4;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const NormalQuad z = normal4(offset + static_cast<uint64_t>(q), seed);
    const int64_t base = 4 * q;
    if (base + 4 <= n) {
      *reinterpret_cast<float4*>(out + base) = make_float4(z.z[0], z.z[1], z.z[2], z.z[3]);
    } else {
      for (int j = 0; base + j < n; ++j) out[base + j] = z.z[j];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    rng_words_kernel(int32_t* __restrict__ out, int64_t nq, uint64_t seed, uint64_t offset) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const PhiloxQuad w = philox4x32_10(offset + static_cast<uint64_t>(q), seed);
    reinterpret_cast<int4*>(out)[q] = make_int4(static_cast<int32_t>(w.w[0]), static_cast<int32_t>(w.w[1]),
                                                static_cast<int32_t>(w.w[2]), static_cast<int32_t>(w.w[3]));
  }
}

__global__ void __launch_bounds__(kThreads)
    rng_uniform_kernel(float* __restrict__ out, int64_t nq, uint64_t seed, uint64_t offset) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const PhiloxQuad w = philox4x32_10(offset + static_cast<uint64_t>(q), seed);
    reinterpret_cast<float4*>(out)[q] = make_float4(uniform_from_word(w.w[0]), uniform_from_word(w.w[1]),
                                                    uniform_from_word(w.w[2]), uniform_from_word(w.w[3]));
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a grid-stride launch: enough blocks to fill the device, no more than the work.
unsigned int grid_size(int64_t blocks_needed, c10::DeviceIndex device) {
  static int sm_cache[256] = {0};
  int& sms = sm_cache[static_cast<unsigned char>(device)];
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  }
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks_needed, cap)));
}

void check_cuda(const at::Tensor& t, const std::string& what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor, got device ", t.device());
}

void check_counter_range(int64_t offset, int64_t n, const std::string& prefix) {
  TORCH_CHECK(offset <= INT64_MAX - num_quads(n), prefix, "offset + ceil(numel / 4) must be < 2^63, got offset=",
              offset, ", numel=", n);
}

bool aligned4(const void* p, size_t elem) { return reinterpret_cast<uintptr_t>(p) % (4 * elem) == 0; }

int32_t desc_flags(const at::Tensor& in, const void* out, const at::Tensor& sigma) {
  int32_t f = 0;
  if (sigma.scalar_type() == at::kFloat) f |= kSigmaFloat;
  if (aligned4(in.data_ptr(), in.element_size())) f |= kVecIn;
  if (aligned4(out, in.element_size())) f |= kVecOut;
  return f;
}

// Indices of the non-empty tensors grouped by dtype, each group split into packs of kMaxPack.
std::vector<std::vector<size_t>> make_groups(const std::vector<at::Tensor>& ts) {
  std::vector<std::vector<size_t>> groups;
  std::vector<at::ScalarType> types;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel() == 0) continue;
    size_t g = 0;
    while (g < types.size() && types[g] != ts[i].scalar_type()) ++g;
    if (g == types.size()) {
      types.push_back(ts[i].scalar_type());
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  std::vector<std::vector<size_t>> packs;
  for (const auto& g : groups) {
    for (size_t b = 0; b < g.size(); b += kMaxPack) {
      packs.emplace_back(g.begin() + b, g.begin() + std::min(g.size(), b + kMaxPack));
    }
  }
  return packs;
}

// Forward of already checked, contiguous tensors.
void perturb_launch(const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& alphas,
                    const std::vector<at::Tensor>& sigmas, int64_t seed, const std::vector<int64_t>& offsets,
                    const std::vector<int64_t>& inners, const std::vector<at::Tensor>& outs) {
  for (const auto& idx : make_groups(vs)) {
    Pack pack{};
    pack.count = static_cast<int32_t>(idx.size());
    int64_t units = 0;
    for (size_t j = 0; j < idx.size(); ++j) {
      const size_t i = idx[j];
      Desc& d = pack.d[j];
      d.in = vs[i].data_ptr();
      d.out = outs[i].data_ptr();
      d.alpha = alphas[i].data_ptr();
      d.sigma = sigmas[i].data_ptr();
      d.n = vs[i].numel();
      d.n_alpha = alphas[i].numel();
      d.inner = inners[i];
      d.offset = offsets[i];
      d.flags = desc_flags(vs[i], d.out, sigmas[i]);
      pack.start[j] = units;
      units += cdiv(num_quads(d.n), kThreads);
    }
    pack.start[idx.size()] = units;
    const at::Tensor& first = vs[idx[0]];
    const auto stream = c10::cuda::getCurrentCUDAStream(first.device().index());
    const unsigned int grid = grid_size(units, first.device().index());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "perturb_cuda", [&] {
      perturb_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(pack, static_cast<uint64_t>(seed));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// Alpha gradient of already checked, contiguous grads; outs[i] has alphas[i]'s shape.
void alpha_grad_launch(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& alphas,
                       const std::vector<at::Tensor>& sigmas, int64_t seed, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& inners, const std::vector<at::Tensor>& outs) {
  for (const auto& idx : make_groups(grads)) {
    const at::Tensor& first = grads[idx[0]];
    Pack stage1{};
    stage1.count = static_cast<int32_t>(idx.size());
    int64_t units1 = 0;
    int64_t parts = 0;
    std::vector<int64_t> units2(idx.size(), 0);
    for (size_t j = 0; j < idx.size(); ++j) {
      const size_t i = idx[j];
      Desc& d = stage1.d[j];
      d.in = grads[i].data_ptr();
      d.out = outs[i].data_ptr();
      d.alpha = alphas[i].data_ptr();
      d.sigma = sigmas[i].data_ptr();
      d.n = grads[i].numel();
      d.n_alpha = alphas[i].numel();
      d.offset = offsets[i];
      d.flags = desc_flags(grads[i], d.out, sigmas[i]);
      // Layerwise: the whole tensor is one segment.
      d.inner = d.n_alpha == 1 ? d.n : inners[i];
      d.segs = d.n / d.inner;  // exact: checked by check_perturb_args
      int64_t u1 = 0;
      if (d.inner == 1 && d.n_alpha == d.n) {
        d.mode = kDirectMode;
        d.chunks = 0;
        u1 = cdiv(num_quads(d.n), kWarpSize);
      } else if (d.inner < kThreadModeMaxInner) {
        d.mode = kThreadMode;
        d.chunks = 1;
        u1 = cdiv(d.segs, kWarpSize);
        units2[j] = d.n_alpha;
      } else {
        d.mode = kWarpMode;
        d.chunks = cdiv(d.inner, kChunk);
        u1 = d.segs * d.chunks;
        units2[j] = d.n_alpha;
      }
      d.part_base = parts;
      parts += d.mode == kDirectMode ? 0 : d.segs * d.chunks;
      stage1.start[j] = units1;
      units1 += u1;
    }
    stage1.start[idx.size()] = units1;
    Pack stage2 = stage1;
    int64_t total2 = 0;
    for (size_t j = 0; j < idx.size(); ++j) {
      stage2.start[j] = total2;
      total2 += units2[j];
    }
    stage2.start[idx.size()] = total2;

    const bool f64 = first.scalar_type() == at::kDouble;
    const at::Tensor part =
        at::empty({std::max<int64_t>(parts, 1)}, first.options().dtype(f64 ? at::kDouble : at::kFloat));
    const auto device = first.device().index();
    const auto stream = c10::cuda::getCurrentCUDAStream(device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "perturb_alpha_grad_cuda", [&] {
      using A = acc_t<scalar_t>;
      A* part_ptr = part.data_ptr<A>();
      alpha_grad_partials_kernel<scalar_t>
          <<<grid_size(cdiv(units1, kWarps), device), kThreads, 0, stream>>>(stage1, static_cast<uint64_t>(seed),
                                                                            part_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (total2 > 0) {
        alpha_grad_reduce_kernel<scalar_t>
            <<<grid_size(cdiv(total2, kWarps), device), kThreads, 0, stream>>>(stage2, part_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Op implementations (CUDA dispatch key)
// ---------------------------------------------------------------------------

at::Tensor noise_cuda(const at::Tensor& like, int64_t seed, int64_t offset) {
  check_cuda(like, "like");
  check_seed_offset(seed, offset);
  check_counter_range(offset, like.numel(), "");
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream(like.device().index());
  noise_kernel<<<grid_size(cdiv(num_quads(n), kThreads), like.device().index()), kThreads, 0, stream>>>(
      out.data_ptr<float>(), n, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor rng_words_cuda(const at::Tensor& like, int64_t seed, int64_t offset) {
  check_cuda(like, "like");
  check_seed_offset(seed, offset);
  check_counter_range(offset, like.numel(), "");
  c10::cuda::CUDAGuard guard(like.device());
  const int64_t nq = num_quads(like.numel());
  at::Tensor out = at::empty({4 * nq}, like.options().dtype(at::kInt));
  if (nq == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream(like.device().index());
  rng_words_kernel<<<grid_size(cdiv(nq, kThreads), like.device().index()), kThreads, 0, stream>>>(
      out.data_ptr<int32_t>(), nq, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor rng_uniform_cuda(const at::Tensor& like, int64_t seed, int64_t offset) {
  check_cuda(like, "like");
  check_seed_offset(seed, offset);
  check_counter_range(offset, like.numel(), "");
  c10::cuda::CUDAGuard guard(like.device());
  const int64_t nq = num_quads(like.numel());
  at::Tensor out = at::empty({4 * nq}, like.options().dtype(at::kFloat));
  if (nq == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream(like.device().index());
  rng_uniform_kernel<<<grid_size(cdiv(nq, kThreads), like.device().index()), kThreads, 0, stream>>>(
      out.data_ptr<float>(), nq, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Checks one (v, alpha, sigma) triple of a single or list op; `prefix` names the list element.
void check_one(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma, int64_t seed, int64_t offset,
               int64_t inner, const char* vname, const std::string& prefix) {
  check_cuda(v, prefix + vname);
  check_perturb_args(v, alpha, sigma, seed, offset, inner, vname, prefix);
  check_counter_range(offset, v.numel(), prefix);
}

at::Tensor perturb_cuda(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma, int64_t seed,
                        int64_t offset, int64_t inner) {
  check_one(v, alpha, sigma, seed, offset, inner, "v", "");
  c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor vc = v.contiguous();
  at::Tensor out = at::empty_like(vc, at::MemoryFormat::Contiguous);
  if (vc.numel() == 0) return out;
  perturb_launch({vc}, {alpha.contiguous()}, {sigma}, seed, {offset}, {inner}, {out});
  return out;
}

at::Tensor perturb_alpha_grad_cuda(const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& sigma,
                                   int64_t seed, int64_t offset, int64_t inner) {
  check_one(grad, alpha, sigma, seed, offset, inner, "grad", "");
  c10::cuda::CUDAGuard guard(grad.device());
  if (grad.numel() == 0) return at::zeros_like(alpha, at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty_like(alpha, at::MemoryFormat::Contiguous);
  alpha_grad_launch({grad.contiguous()}, {alpha}, {sigma}, seed, {offset}, {inner}, {out});
  return out;
}

// `list` names the list argument ("vs", "grads"), `elem` one of its tensors ("v", "grad").
void check_multi(const char* op, const char* list, const char* elem, at::TensorList vs, at::TensorList alphas,
                 at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets, at::IntArrayRef inners) {
  check_multi_lengths(op, list, vs.size(), alphas.size(), sigmas.size(), offsets.size(), inners.size());
  for (size_t i = 0; i < vs.size(); ++i) {
    const std::string prefix = list_prefix(list, i);
    check_one(vs[i], alphas[i], sigmas[i], seed, offsets[i], inners[i], elem, prefix);
    TORCH_CHECK(vs[i].device() == vs[0].device(), op, ": all ", list, " must be on one device, got ",
                vs[0].device(), " and ", vs[i].device(), " (", prefix, ")");
  }
}

std::vector<at::Tensor> perturb_multi_cuda(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas,
                                           int64_t seed, at::IntArrayRef offsets, at::IntArrayRef inners) {
  check_multi("perturb_multi", "vs", "v", vs, alphas, sigmas, seed, offsets, inners);
  std::vector<at::Tensor> vc, ac, sc, outs;
  for (size_t i = 0; i < vs.size(); ++i) {
    vc.push_back(vs[i].contiguous());
    ac.push_back(alphas[i].contiguous());
    sc.push_back(sigmas[i]);
    outs.push_back(at::empty_like(vc.back(), at::MemoryFormat::Contiguous));
  }
  if (vs.empty()) return outs;
  c10::cuda::CUDAGuard guard(vs[0].device());
  perturb_launch(vc, ac, sc, seed, offsets.vec(), inners.vec(), outs);
  return outs;
}

std::vector<at::Tensor> perturb_alpha_grad_multi_cuda(at::TensorList grads, at::TensorList alphas,
                                                      at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets,
                                                      at::IntArrayRef inners) {
  check_multi("perturb_alpha_grad_multi", "grads", "grad", grads, alphas, sigmas, seed, offsets, inners);
  std::vector<at::Tensor> gc, ac, sc, outs;
  for (size_t i = 0; i < grads.size(); ++i) {
    gc.push_back(grads[i].contiguous());
    ac.push_back(alphas[i]);
    sc.push_back(sigmas[i]);
    outs.push_back(grads[i].numel() == 0 ? at::zeros_like(alphas[i], at::MemoryFormat::Contiguous)
                                         : at::empty_like(alphas[i], at::MemoryFormat::Contiguous));
  }
  if (grads.empty()) return outs;
  c10::cuda::CUDAGuard guard(grads[0].device());
  alpha_grad_launch(gc, ac, sc, seed, offsets.vec(), inners.vec(), outs);
  return outs;
}

}  // namespace
}  // namespace pni_fast

TORCH_LIBRARY_IMPL(pni_fast, CUDA, m) {
  m.impl("noise", &pni_fast::noise_cuda);
  m.impl("rng_words", &pni_fast::rng_words_cuda);
  m.impl("rng_uniform", &pni_fast::rng_uniform_cuda);
  m.impl("perturb", &pni_fast::perturb_cuda);
  m.impl("perturb_alpha_grad", &pni_fast::perturb_alpha_grad_cuda);
  m.impl("perturb_multi", &pni_fast::perturb_multi_cuda);
  m.impl("perturb_alpha_grad_multi", &pni_fast::perturb_alpha_grad_multi_cuda);
}
