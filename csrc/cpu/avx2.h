// AVX2 + FMA kernels (see cpu_kernels.h for the set every ISA implements): the AVX-512 ones at
// 8 lanes, for CPUs without AVX-512 (AMD before Zen 4, older Intel). AVX2 has no mask
// registers: tails are loaded through a zero- (or fill-) padded copy and stored through
// maskstore, and float -> int64 goes through double.
#pragma once

#include "cpu_kernels.h"

namespace ptp::cpu::avx2 {

PTP_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

PTP_AVX2 inline __m256 load8(const c10::BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

PTP_AVX2 inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

PTP_AVX2 inline __m256 load8(const int8_t* x) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// x[0..8) as float32, or only x[0..remaining) followed by `fill` when remaining < 8.
template <typename T>
PTP_AVX2 inline __m256 load8(const T* x, int64_t remaining, float fill) {
  if (remaining >= 8) return load8(x);
  alignas(32) float tail[8];
  for (int64_t i = 0; i < 8; ++i) tail[i] = i < remaining ? static_cast<float>(x[i]) : fill;
  return _mm256_load_ps(tail);
}

// The maskstore mask of the first min(remaining, 8) lanes (none when remaining <= 0).
PTP_AVX2 inline __m256i lanes(int64_t remaining) {
  const int32_t count = static_cast<int32_t>(std::clamp<int64_t>(remaining, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y[0..8) = v, or only y[0..remaining) when remaining < 8 (nothing when remaining <= 0). Whole
// vectors take a plain store: AMD's masked stores are slow, and on a Zen 3 EPYC the LoRA update
// at 72 rows took 437 us with them on every store against 274 us (benchmarks/bench_ops.py).
PTP_AVX2 inline void store8(float* y, __m256 v, int64_t remaining) {
  if (remaining >= 8) {
    _mm256_storeu_ps(y, v);
  } else if (remaining > 0) {
    _mm256_maskstore_ps(y, lanes(remaining), v);
  }
}

PTP_AVX2 inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

PTP_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <typename T>
PTP_AVX2 float row_max(const T* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 8) best = _mm256_max_ps(best, load8(x + i, n - i, -INFINITY));
  return reduce_max(best);
}

template <typename T>
PTP_AVX2 int64_t first_equal(const T* x, int64_t n, float value) {
  const __m256 target = _mm256_set1_ps(value);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 hit = _mm256_cmp_ps(load8(x + i, n - i, NAN), target, _CMP_EQ_OQ);
    if (const int bits = _mm256_movemask_ps(hit)) return i + __builtin_ctz(bits);
  }
  return n;
}

// ptp::exp_nonpositive, 8 lanes at a time (d in [kMinExponent, 0]; the caller masks the rest).
PTP_AVX2 inline __m256 exp_nonpositive(__m256 d) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 c[] = {_mm256_set1_ps(ptp::kC6), _mm256_set1_ps(ptp::kC5),
                      _mm256_set1_ps(ptp::kC4), _mm256_set1_ps(ptp::kC3),
                      _mm256_set1_ps(ptp::kC2), one, one};
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(d, _mm256_set1_ps(ptp::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(d, _mm256_mul_ps(k, _mm256_set1_ps(ptp::kLn2Hi)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(k, _mm256_set1_ps(ptp::kLn2Lo)));
  __m256 poly = c[0];
  for (int j = 1; j < 7; ++j) poly = _mm256_add_ps(_mm256_mul_ps(poly, r), c[j]);
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
}

// Four integral floats in [0, 2^52) as int64, exactly: through double and the 2^52 trick.
PTP_AVX2 inline __m256i integral_to_int64(__m128 x) {
  const __m256d magic = _mm256_set1_pd(4503599627370496.0);  // 2^52
  return _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(_mm256_cvtps_pd(x), magic)),
                          _mm256_castpd_si256(magic));
}

// The op sequence of ptp::weight_of, 8 lanes at a time.
template <typename T>
PTP_AVX2 int64_t weights(const T* x, int64_t n, const RowParams& p, int64_t* block_sums,
                         int64_t* w) {
  const __m256 inv_t = _mm256_set1_ps(p.inv_temperature), max_s = _mm256_set1_ps(p.max_scaled);
  const __m256 min_d = _mm256_set1_ps(ptp::kMinExponent), min_p = _mm256_set1_ps(p.min_p);
  const __m256 scale = _mm256_set1_ps(ptp::kWeightScale);
  int64_t total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = start; i < std::min(n, start + kBlock); i += 8) {
      // Lanes past the row are -inf logits: weight 0.
      const __m256 d = _mm256_sub_ps(_mm256_mul_ps(load8(x + i, n - i, -INFINITY), inv_t), max_s);
      const __m256 e = exp_nonpositive(d);
      const __m256 valid = _mm256_and_ps(_mm256_cmp_ps(d, min_d, _CMP_GE_OQ),
                                         _mm256_cmp_ps(e, min_p, _CMP_GE_OQ));
      // floor(e * 2^40) <= 2^40: truncated in float, then converted exactly; invalid lanes 0.
      const __m256 scaled = _mm256_round_ps(_mm256_and_ps(_mm256_mul_ps(e, scale), valid),
                                            _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256i lo = integral_to_int64(_mm256_castps256_ps128(scaled));
      const __m256i hi = integral_to_int64(_mm256_extractf128_ps(scaled, 1));
      if (w) {
        alignas(32) int64_t lane_weights[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lane_weights), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(lane_weights + 4), hi);
        std::copy_n(lane_weights, std::min<int64_t>(8, n - i), w + i);
      }
      sum = _mm256_add_epi64(sum, _mm256_add_epi64(lo, hi));
    }
    alignas(32) int64_t lane_sums[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane_sums), sum);
    block_sums[start / kBlock] = lane_sums[0] + lane_sums[1] + lane_sums[2] + lane_sums[3];
    total += block_sums[start / kBlock];
  }
  return total;
}

// y_i[0..n) += sum_r a_i[r] * b[r * ldb + 0..n) for rows i < R, as a register-blocked
// micro-kernel: R rows x 16 columns of y stay in registers over all ranks (16 ymm registers
// hold no more), and each vector of b is loaded once for the R rows.
template <int R>
PTP_AVX2 void rank_update(const float* const* a, int64_t rank, const float* b, int64_t ldb,
                          float* const* y, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const int64_t remaining[2] = {n - c, n - c - 8};
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < 2; ++j) acc[i][j] = load8(y[i] + c + 8 * j, remaining[j], 0.0f);
    }
    for (int64_t r = 0; r < rank; ++r) {
      __m256 b_r[2];
      for (int j = 0; j < 2; ++j) b_r[j] = load8(b + r * ldb + c + 8 * j, remaining[j], 0.0f);
      for (int i = 0; i < R; ++i) {
        const __m256 a_ir = _mm256_set1_ps(a[i][r]);
        for (int j = 0; j < 2; ++j) acc[i][j] = _mm256_fmadd_ps(a_ir, b_r[j], acc[i][j]);
      }
    }
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < 2; ++j) store8(y[i] + c + 8 * j, acc[i][j], remaining[j]);
    }
  }
}

template <typename T>
PTP_AVX2 void to_float(const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    store8(y + i, load8(x + i, n - i, 0.0f), n - i);
  }
}

// y[i][0..columns) = x[i] . W^T (+ `update`) for R <= 6 rows of x ([k_dim] each, ldx apart) and
// one panel of 16 output columns of fp16 or int8 weights ([k_dim, 16], k-major; int8 columns
// times their `scales`, none for fp16): 2R accumulators in registers over all of k (enough
// independent FMA chains to hide their latency), and each weight vector converted once for the
// R rows. The accumulators are two plain arrays, unrolled, so that GCC keeps them in registers
// instead of spilling them every iteration. The low-rank update runs on the same accumulators
// before they are stored: the drafter's gated LoRA costs no pass over the output of its own.
template <int R, typename W>
PTP_AVX2 void panel_gemm_tile(const float* x, int64_t ldx, const W* panel, const float* scales,
                              int64_t k_dim, const PanelUpdate& update, float* y, int64_t ldy,
                              int64_t columns) {
  __m256 low[R], high[R];  // columns 0..8 and 8..16
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) low[i] = high[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + k * 16) + kPrefetchBytes, _MM_HINT_T0);
    const __m256 w_low = load8(panel + k * 16), w_high = load8(panel + k * 16 + 8);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 x_ik = _mm256_broadcast_ss(x + i * ldx + k);
      low[i] = _mm256_fmadd_ps(x_ik, w_low, low[i]);
      high[i] = _mm256_fmadd_ps(x_ik, w_high, high[i]);
    }
  }
  if (scales != nullptr) {
    const __m256 scale_low = _mm256_loadu_ps(scales), scale_high = _mm256_loadu_ps(scales + 8);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      low[i] = _mm256_mul_ps(low[i], scale_low);
      high[i] = _mm256_mul_ps(high[i], scale_high);
    }
  }
  for (int64_t r = 0; r < update.width; ++r) {
    const __m256 b_low = load8(update.b + r * 16), b_high = load8(update.b + r * 16 + 8);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 xa_ir = _mm256_broadcast_ss(update.xa + i * update.ld_xa + r);
      low[i] = _mm256_fmadd_ps(xa_ir, b_low, low[i]);
      high[i] = _mm256_fmadd_ps(xa_ir, b_high, high[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    store8(y + i * ldy, low[i], columns);
    store8(y + i * ldy + 8, high[i], columns - 8);
  }
}

// The drafter attention's primitives (DraftAttention in ops.cpp); see avx512::Attention.
template <typename T>
struct Attention {
  static constexpr int64_t kValueDims = 16;  // dimensions per weighted_values call

  template <int R>
  static PTP_AVX2 void score_rows(const float* queries, const T* keys, int64_t run,
                                  int64_t head_dim, int64_t block_size, float* scores,
                                  int64_t score_stride) {
    for (int64_t t = 0; t < run; t += 8) {
      __m256 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < head_dim; ++d) {
        const __m256 k = load8(keys + d * block_size + t, run - t, 0.0f);
        for (int i = 0; i < R; ++i) {
          acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(queries[i * head_dim + d]), k, acc[i]);
        }
      }
      for (int i = 0; i < R; ++i) store8(scores + i * score_stride + t, acc[i], run - t);
    }
  }

  static PTP_AVX2 float dot(const float* q, const T* k, int64_t head_dim) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 8) {
      acc = _mm256_fmadd_ps(load8(q + d, head_dim - d, 0.0f), load8(k + d, head_dim - d, 0.0f),
                            acc);
    }
    return reduce_add(acc);
  }

  static PTP_AVX2 float softmax(float* row, int64_t width) {
    const __m256 floor = _mm256_set1_ps(ptp::kMinExponent);
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < width; i += 8) {
      best = _mm256_max_ps(best, load8(row + i, width - i, -INFINITY));
    }
    const __m256 max = _mm256_set1_ps(reduce_max(best));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < width; i += 8) {
      const __m256 shifted = _mm256_sub_ps(load8(row + i, width - i, -INFINITY), max);
      // Scores below the row maximum by more than -kMinExponent (and -inf) weigh 0.
      const __m256 keep = _mm256_cmp_ps(shifted, floor, _CMP_GE_OQ);
      const __m256 e = _mm256_and_ps(keep, exp_nonpositive(_mm256_max_ps(shifted, floor)));
      store8(row + i, e, width - i);
      sum = _mm256_add_ps(sum, e);
    }
    return reduce_add(sum);
  }

  // out[i][d0..d0 + 16) for rows i < R: two vectors per row in registers.
  template <int R>
  static PTP_AVX2 void weighted_values(const float* const* p, const T* const* values,
                                       int64_t count, int64_t head_dim, int64_t d0,
                                       float* const* out) {
    const int64_t remaining[2] = {head_dim - d0, head_dim - d0 - 8};
    __m256 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
      if (values[j] == nullptr) continue;
      const __m256 v[2] = {load8(values[j] + d0, remaining[0], 0.0f),
                           load8(values[j] + d0 + 8, remaining[1], 0.0f)};
      for (int i = 0; i < R; ++i) {
        const __m256 weight = _mm256_set1_ps(p[i][j]);
        for (int c = 0; c < 2; ++c) acc[i][c] = _mm256_fmadd_ps(weight, v[c], acc[i][c]);
      }
    }
    for (int i = 0; i < R; ++i) {
      for (int c = 0; c < 2; ++c) {
        store8(out[i] + d0 + 8 * c, acc[i][c], remaining[c]);
      }
    }
  }
};

}  // namespace ptp::cpu::avx2
