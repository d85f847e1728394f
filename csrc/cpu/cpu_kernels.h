// What the CPU kernels of every ISA share: the vocabulary block size and the target attributes.
// Each ISA header (avx512.h, avx2.h) implements the same set of kernels in its own namespace:
//   row_max, first_equal, weights      the per-row vocabulary passes of sampling; exactly the
//                                      values of ptp_kernels.h, so the ISA never changes a token
//   rank_update<R>, to_float           the gated LoRA expand's micro-kernels
//   Attention<T>                       the drafter attention's primitives (score_rows<R>, dot,
//                                      softmax, weighted_values<R>; see DraftAttention in ops.cpp)
// ops.cpp holds the scalar versions and picks one ISA at run time.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include "../ptp_kernels.h"

#define PTP_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define PTP_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ptp::cpu {

constexpr int64_t kBlock = 256;  // tokens per prefix-sum block of the search

}  // namespace ptp::cpu
