// cpu_isa(): the SIMD variant the CPU kernels run ("avx512", "avx2" or
// "generic"; chosen once at run time in normal_block.cpp, see isa.h), for
// `python -m pni_fast info` and bug reports. Schema in csrc/ops.cpp.
//
// The op has no tensor argument, hence no backend dispatch key: its kernel is
// registered as CompositeImplicitAutograd, which the dispatcher also runs for
// calls that carry no key.
#include <torch/library.h>

#include <string>

#include "normal_block.h"

namespace pni_fast {
namespace cpu {
namespace {

std::string cpu_isa() { return normal_block_isa(); }

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa); }

}  // namespace cpu
}  // namespace pni_fast
