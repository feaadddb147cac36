// CPU kernels of the raw RNG ops (noise, rng_words, rng_uniform; schemas in
// csrc/ops.cpp). Element i uses Philox counter offset + i / 4 (design.md
// section 3); noise comes from the same vectorized block generator as perturb
// (normal_block.h), words and uniforms from philox.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "../checks.h"
#include "../philox.h"
#include "normal_block.h"
#include "rng_state.h"

namespace pni_fast {
namespace cpu {
namespace {

// Blocks per parallel chunk of noise: 64 blocks = 16K elements.
constexpr int64_t kGrainBlocks = 64;

// Checks of the raw RNG ops; returns (seed, first counter).
std::pair<uint64_t, uint64_t> rng_op_args(const char* op, const Tensor& like, int64_t seed, int64_t offset,
                                          const std::optional<Tensor>& rng_state) {
  check_seed_offset(seed, offset);
  check_offset_fits(offset, like.numel());
  const RngBase r = rng_base(rng_state, seed, op);
  return {r.seed, first_counter(r, offset, like.numel())};
}

Tensor noise_cpu(const Tensor& like, int64_t seed_arg, int64_t offset_arg, const std::optional<Tensor>& rng_state) {
  const auto [seed, offset] = rng_op_args("noise", like, seed_arg, offset_arg, rng_state);
  Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  float* op = out.mutable_data_ptr<float>();
  const int64_t nblocks = (n + kBlockElems - 1) / kBlockElems;
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kBlockElems];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kBlockElems;
      const int64_t len = std::min<int64_t>(kBlockElems, n - e0);
      const uint64_t ctr = offset + static_cast<uint64_t>(b) * kBlockQuads;
      if (len == kBlockElems) {
        normal_block(seed, ctr, op + e0);
      } else {
        normal_block(seed, ctr, z);
        std::memcpy(op + e0, z, sizeof(float) * static_cast<size_t>(len));
      }
    }
  });
  return out;
}

// Shared body of rng_words / rng_uniform: out[4q + k] = word_fn(word k of counter offset + q).
template <typename T, typename WordFn>
Tensor rng_quads_cpu(const char* op_name, const Tensor& like, int64_t seed_arg, int64_t offset_arg,
                     const std::optional<Tensor>& rng_state, WordFn word_fn) {
  const auto [seed, offset] = rng_op_args(op_name, like, seed_arg, offset_arg, rng_state);
  const int64_t nq = num_quads(like.numel());
  Tensor out = at::empty({4 * nq}, like.options().dtype(c10::CppTypeToScalarType<T>::value));
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, nq, 4096, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const PhiloxQuad w = philox4x32_10(offset + static_cast<uint64_t>(q), seed);
      for (int k = 0; k < 4; ++k) {
        op[4 * q + k] = word_fn(w.w[k]);
      }
    }
  });
  return out;
}

Tensor rng_words_cpu(const Tensor& like, int64_t seed, int64_t offset, const std::optional<Tensor>& rng_state) {
  return rng_quads_cpu<int32_t>("rng_words", like, seed, offset, rng_state, [](uint32_t w) {
    int32_t bits;
    std::memcpy(&bits, &w, sizeof(bits));
    return bits;
  });
}

Tensor rng_uniform_cpu(const Tensor& like, int64_t seed, int64_t offset, const std::optional<Tensor>& rng_state) {
  return rng_quads_cpu<float>("rng_uniform", like, seed, offset, rng_state,
                              [](uint32_t w) { return uniform_from_word(w); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CPU, m) {
  m.impl("noise", &noise_cpu);
  m.impl("rng_words", &rng_words_cpu);
  m.impl("rng_uniform", &rng_uniform_cpu);
}

}  // namespace cpu
}  // namespace pni_fast
