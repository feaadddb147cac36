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
  check_rng_state(rng_state, at::Device(at::kCPU), op);  // also range-checks the two values (a CPU state)
  const int64_t* st = rng_state->const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(st[0]), st[1]};
}

// First Philox counter of a tensor of n elements at `offset` (already checked >= 0):
// base + offset, with base + offset + ceil(n / 4) < 2^63 (checks.h: one rule, one message).
inline uint64_t first_counter(const RngBase& r, int64_t offset, int64_t n, const std::string& prefix = "") {
  check_state_counter(r.base, offset, n, prefix);
  return static_cast<uint64_t>(r.base + offset);
}

}  // namespace cpu
}  // namespace pni_fast
