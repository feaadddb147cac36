// Work decomposition and per-thread bodies of the CUDA kernels (perturb_cuda.cu,
// perturb_alpha_grad_cuda.cu, rng_cuda.cu).
//
// Everything here is host+device (PNI_HD) and free of CUDA intrinsics, so the
// same code also runs in a plain C++ host emulation of the kernels
// (tests/support/cuda_host_emulation.cpp) that checks the index math against the
// numpy oracle on machines without a GPU. The kernels in the .cu files only
// add the thread/warp mapping (threadIdx, __shfl_xor_sync) around these bodies.
//
// Work units:
//   * forward, one tensor: a grid-stride loop over quads (4 elements each), one thread per quad,
//     everything per tensor hoisted out of the loop (fwd_prepare); index type I = int32_t when
//     the tensor has fewer than kMaxInt32Elems elements, else int64_t (chosen at launch);
//     channelwise alpha index (i / inner) % n_alpha by precomputed magic-number division;
//   * forward, list op: one unit = one tile of kThreads quads of one tensor, one thread per quad;
//   * alpha gradient, stage 1: one unit = one warp of kWarpSize lanes;
//       - warp mode: unit u = (segment u / chunks, chunk u % chunks) of kChunk elements,
//         each lane sums quads lane, lane + 32, ... of the chunk, then a warp butterfly;
//       - thread mode (inner < kThreadModeMaxInner): lane l sums segment 32u + l alone;
//       - direct mode (elementwise alpha): lane l writes the gradient of quad 32u + l;
//   * alpha gradient, stage 2: one unit = one block. An alpha index with at least
//     kStage2BlockMin partials gets a whole block (thread-strided sums, a warp butterfly per
//     warp, then thread 0 adds the kWarps warp sums in order); smaller ones get one warp each
//     (kWarps indices per block, lane-strided sums, a warp butterfly). Fixed order either way.
// A segment is a run of `inner` elements that share one alpha index; the tensor has
// segs = n / inner of them and alpha index k owns segments k, k + n_alpha, ...
#pragma once

// The parts, one concept each:
//   perturb_desc.cuh          Desc / Pack (the launch table), constants, RngKey, acc_t, Vec4
//   fastdiv.cuh               division by a per-tensor constant (magic numbers)
//   perturb_forward_impl.cuh  forward bodies (fwd_prepare, fwd_quad, perturb_unit_thread)
//   alpha_grad_impl.cuh       alpha-gradient bodies (stage 1 and stage 2)
//   launch_plan.cuh           host-side planning (plan_forward, plan_alpha_grad_pack, ...)
#include "perturb_desc.cuh"
#include "fastdiv.cuh"
#include "perturb_forward_impl.cuh"
#include "alpha_grad_impl.cuh"
#include "launch_plan.cuh"
