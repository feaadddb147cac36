// Per-ISA compilation of CPU loops without -march: functions marked
// PNI_TARGET_AVX2 / PNI_TARGET_AVX512 are compiled for that ISA and called only
// after a run-time CPU check (normal_block.cpp picks the variant once; other
// files follow its choice through normal_block_isa()). Bodies shared by the
// variants are PNI_ALWAYS_INLINE, so each variant gets its own vectorized copy.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(PNI_FAST_GENERIC_ONLY)
#define PNI_X86_DISPATCH 1
#include <immintrin.h>
#define PNI_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c")))
#define PNI_TARGET_AVX512 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c,avx512f,avx512dq,avx512vl,avx512bw")))
#else
#define PNI_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PNI_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PNI_ALWAYS_INLINE inline
#endif
