// rng_state of the CPU ops (docs/ops.md): read on the host and range-checked
// like the seed and offset arguments.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "../checks.h"

namespace pni_fast {
namespace cpu {

using at::Tensor;

// The Philox key and the counter base every tensor of a call adds to its offset:
// (seed, 0) without rng_state, else rng_state's two values, range-checked like the
// seed and offset arguments.
struct RngBase {
  uint64_t seed;
  int64_t base;
};

inline RngBase rng_base(const std::optional<Tensor>& rng_state, int64_t seed, const char* op) {
  if (!rng_state.has_value()) {
    return {static_cast<uint64_t>(seed), 0};
  }
  check_rng_state(rng_state, at::Device(at::kCPU), op);
  const int64_t* st = rng_state->const_data_ptr<int64_t>();
  TORCH_CHECK(st[0] >= 0, op, ": rng_state[0] (the seed) must be in [0, 2^63), got ", st[0]);
  TORCH_CHECK(st[1] >= 0, op, ": rng_state[1] (the counter base) must be >= 0, got ", st[1]);
  return {static_cast<uint64_t>(st[0]), st[1]};
}

// First Philox counter of a tensor of n elements at `offset` (already checked >= 0):
// base + offset, with base + offset + ceil(n / 4) < 2^63.
inline uint64_t first_counter(const RngBase& r, int64_t offset, int64_t n, const std::string& prefix = "") {
  TORCH_CHECK(offset <= INT64_MAX - r.base, prefix, "rng_state[1] + offset must be < 2^63, got rng_state[1]=",
              r.base, ", offset=", offset);
  const int64_t ctr = r.base + offset;
  TORCH_CHECK(ctr <= INT64_MAX - num_quads(n), prefix,
              "rng_state[1] + offset + ceil(numel / 4) must be < 2^63, got rng_state[1]=", r.base,
              ", offset=", offset, ", numel=", n);
  return static_cast<uint64_t>(ctr);
}

}  // namespace cpu
}  // namespace pni_fast
