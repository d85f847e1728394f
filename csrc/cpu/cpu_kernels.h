// What the CPU kernels of every ISA share: the vocabulary block size and the target attributes.
// Each ISA header (avx512.h, avx2.h) implements the same set of kernels in its own namespace:
//   row_max, first_equal, weights      the per-row vocabulary passes of sampling; exactly the
//                                      values of ptp_kernels.h, so the ISA never changes a token
//   rank_update<R>, to_float           the gated LoRA expand's micro-kernels
//   panel_gemm_tile<R, W>              panel_linear's micro-kernel (fp16 / int8 weights)
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

// How far ahead of its loads panel_gemm_tile prefetches the packed weights. A drafter pass
// streams every weight once, a few FMAs per byte: left to the hardware prefetcher, the AVX2
// tile ran a pass's 30 layers at 5 rows in 21.7 ms (int8 weights, 4.9 GB/s) against 7.8 ms
// with 4 KiB prefetched ahead (Sapphire Rapids, the 106 MB of weights cycled, not flushed from
// its 480 MB L3; 2 KiB: 8.4, 8 KiB: 8.1 ms).
constexpr int64_t kPrefetchBytes = 4096;

// A gated low-rank update for panel_gemm_tile to add to its panel: y[i] += xa[i][0..width) . b,
// b the panel's [width, 16] block of B^T and xa[i] row i's gated (x A^T) inputs, ld_xa apart.
struct PanelUpdate {
  const float* xa = nullptr;
  int64_t ld_xa = 0;
  const c10::Half* b = nullptr;
  int64_t width = 0;  // 0: no update
};

}  // namespace ptp::cpu
