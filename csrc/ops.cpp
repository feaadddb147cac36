// Schemas of all pni_fast ops: every m.def is here; the files under csrc/cpu
// and csrc/cuda register kernels for them, one file per op family. Every op is
// a pure function of its inputs: the noise is fixed by (seed, offset), so
// autograd, opcheck and torch.compile all see the same values. Autograd
// (torch.library.register_autograd, so torch.func and double backward work)
// and the fake (meta) kernels are registered from Python (autograd:
// pni_fast/ops/autograd.py; fakes: pni_fast/backends/cpp.py), except sigma's
// fake kernels (csrc/cpu/sigma_cpu.cpp). The contract: docs/ops.md.
//
// rng_state (optional, every RNG op): int64 [2] = (seed, counter base) on the
// op's device. When given, the op uses seed rng_state[0] and counter offset
// rng_state[1] + offset and ignores `seed`; it never writes rng_state. CUDA
// kernels read it from device memory (no host sync: CUDA graph replays see the
// state the Python layer advances in-stream); CPU kernels read it on the host.
#include <Python.h>

#include <torch/library.h>

// `import pni_fast._C` only loads this library (which runs the registrations
// below); the module itself has no functions.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "pni_fast compiled kernels (registered as torch.ops.pni_fast.*)",
      -1,       // no per-module state
      nullptr,  // methods
      nullptr,  // slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pni_fast, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // float32 z with like's shape (like's values unused).
  m.def("noise(Tensor like, SymInt seed, int offset, Tensor? rng_state=None) -> Tensor", tags);
  // int32 [4*ceil(n/4)]: raw Philox words (uint32 bits) of counters offset.. in element order.
  m.def("rng_words(Tensor like, SymInt seed, int offset, Tensor? rng_state=None) -> Tensor", tags);
  // float32 [4*ceil(n/4)]: uniform(word) of the same words (before the 1e-7 clamp).
  m.def("rng_uniform(Tensor like, SymInt seed, int offset, Tensor? rng_state=None) -> Tensor", tags);
  // v + alpha[(i / inner) % alpha.numel()] * sigma * z_i, v's dtype; math in float32 (float64 for float64).
  m.def(
      "perturb(Tensor v, Tensor alpha, Tensor sigma, SymInt seed, int offset, int inner, Tensor? rng_state=None) "
      "-> Tensor",
      tags);
  // d/dalpha of sum(grad * perturb(...)): sum of grad_i * sigma * z_i per alpha index, in alpha's
  // dtype, accumulated in float32 (float64 for float64).
  m.def(
      "perturb_alpha_grad(Tensor grad, Tensor alpha, Tensor sigma, SymInt seed, int offset, int inner, "
      "Tensor? rng_state=None) -> Tensor",
      tags);
  // perturb / perturb_alpha_grad of each tensor k with counters offsets[k].. and the Philox key
  // seeds[k], or seeds[0] for every tensor when seeds holds one seed (rng_state given: exactly one
  // seed, unused; the state's seed is every tensor's key).
  m.def(
      "perturb_multi(Tensor[] vs, Tensor[] alphas, Tensor[] sigmas, SymInt[] seeds, int[] offsets, int[] inners, "
      "Tensor? rng_state=None) -> Tensor[]",
      tags);
  m.def(
      "perturb_alpha_grad_multi(Tensor[] grads, Tensor[] alphas, Tensor[] sigmas, SymInt[] seeds, int[] offsets, "
      "int[] inners, Tensor? rng_state=None) -> Tensor[]",
      tags);
  // Unbiased std of all of v's elements as a 0-d tensor (float32; float64 for float64
  // input); 0 when v has fewer than 2 elements. Deterministic two-pass std in float64
  // (rounded once to float32 for float32/float16/bfloat16 inputs). The "sigma" of PNI;
  // CPU, CUDA and Meta kernels (CUDA: same definition, another summation order).
  m.def("sigma(Tensor v) -> Tensor", tags);
  // float32 [len(vs)] (float64 for float64 inputs): element t is bit-for-bit sigma(vs[t]), all
  // tensors in one call. vs: at least one tensor, one dtype, one device; any strides. CPU,
  // CUDA and Meta kernels.
  m.def("sigma_multi(Tensor[] vs) -> Tensor", tags);
  // The eager fast path of the Python layer on CPU (csrc/cpu/noisy_cpu.cpp): sigma, the finite
  // checks, a seed (given, or drawn from `generator` / torch's default CPU generator like
  // torch.randint; noisy_multi: seeds as perturb_multi's, or None: one drawn seed shared by every
  // tensor), then perturb / perturb_multi, with a C++ autograd node whose backward is
  // perturb_alpha_grad(_multi). noisy_multi keeps the noise for the backward when the tensors hold
  // at most save_noise_max elements in all (same results; pni_fast/ops/fast_path.py sets the limit). Not
  // pure (it advances a generator): no tag, no fake kernel; torch.compile and torch.func use the
  // ops above.
  m.def(
      "noisy(Tensor v, Tensor alpha, int offset, int inner, int? seed=None, Generator? generator=None, "
      "str name=\"weight\") -> Tensor");
  m.def(
      "noisy_multi(Tensor[] vs, Tensor[] alphas, int[] offsets, int[] inners, int[]? seeds=None, "
      "Generator? generator=None, str name=\"weights\", int save_noise_max=0) -> Tensor[]");
  // The SIMD variant the CPU kernels run: "avx512", "avx2" or "generic" (csrc/cpu/isa_cpu.cpp).
  // Not a tensor op: no tags, one kernel for every device.
  m.def("cpu_isa() -> str");
  // A seed as pni_fast.rng.draw_seed draws it: the value torch.randint(0, 2**63 - 1, (), generator=g)
  // returns (torch's default CPU generator when None), without a tensor. Not pure (it advances the
  // generator): no tags, no fake kernel; the Python layer calls it only in plain eager mode.
  m.def("draw_seed(Generator? generator=None) -> int");
}
