// AVX-512 kernels (see cpu_kernels.h for the set every ISA implements).
#pragma once

#include "cpu_kernels.h"

namespace ptp::cpu::avx512 {

PTP_AVX512 inline __m512 load16(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }

PTP_AVX512 inline __m512 load16(const c10::BFloat16* x, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

PTP_AVX512 inline __m512 load16(const c10::Half* x, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x));
}

PTP_AVX512 inline __mmask16 lanes(int64_t remaining) {
  return remaining >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << remaining) - 1);
}

template <typename T>
PTP_AVX512 float row_max(const T* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    best = _mm512_mask_max_ps(best, m, best, load16(x + i, m));
  }
  return _mm512_reduce_max_ps(best);
}

template <typename T>
PTP_AVX512 int64_t first_equal(const T* x, int64_t n, float value) {
  const __m512 target = _mm512_set1_ps(value);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16(x + i, m), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return n;
}

// ptp::exp_nonpositive, 16 lanes at a time (d in [kMinExponent, 0]; the caller masks the rest).
PTP_AVX512 inline __m512 exp_nonpositive(__m512 d) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 c[] = {_mm512_set1_ps(ptp::kC6), _mm512_set1_ps(ptp::kC5),
                      _mm512_set1_ps(ptp::kC4), _mm512_set1_ps(ptp::kC3),
                      _mm512_set1_ps(ptp::kC2), one, one};
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(ptp::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(d, _mm512_mul_ps(k, _mm512_set1_ps(ptp::kLn2Hi)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(k, _mm512_set1_ps(ptp::kLn2Lo)));
  __m512 poly = c[0];
  for (int j = 1; j < 7; ++j) poly = _mm512_add_ps(_mm512_mul_ps(poly, r), c[j]);
  const __m512i exponent = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
  return _mm512_mul_ps(poly, _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23)));
}

// The op sequence of ptp::weight_of, 16 lanes at a time.
template <typename T>
PTP_AVX512 int64_t weights(const T* x, int64_t n, const RowParams& p, int64_t* block_sums,
                           int64_t* w) {
  const __m512 inv_t = _mm512_set1_ps(p.inv_temperature), max_s = _mm512_set1_ps(p.max_scaled);
  const __m512 min_d = _mm512_set1_ps(ptp::kMinExponent), min_p = _mm512_set1_ps(p.min_p);
  const __m512 scale = _mm512_set1_ps(ptp::kWeightScale);
  int64_t total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = start; i < std::min(n, start + kBlock); i += 16) {
      const __mmask16 m = lanes(n - i);
      const __m512 d = _mm512_sub_ps(_mm512_mul_ps(load16(x + i, m), inv_t), max_s);
      __mmask16 valid = _mm512_mask_cmp_ps_mask(m, d, min_d, _CMP_GE_OQ);
      const __m512 e = exp_nonpositive(d);
      valid = _mm512_mask_cmp_ps_mask(valid, e, min_p, _CMP_GE_OQ);
      const __m512 scaled = _mm512_mul_ps(e, scale);
      const __m512i lo = _mm512_maskz_mov_epi64(
          static_cast<__mmask8>(valid), _mm512_cvttps_epi64(_mm512_castps512_ps256(scaled)));
      const __m512i hi = _mm512_maskz_mov_epi64(
          static_cast<__mmask8>(valid >> 8), _mm512_cvttps_epi64(_mm512_extractf32x8_ps(scaled, 1)));
      if (w) {
        _mm512_mask_storeu_epi64(w + i, static_cast<__mmask8>(m), lo);
        _mm512_mask_storeu_epi64(w + i + 8, static_cast<__mmask8>(m >> 8), hi);
      }
      sum = _mm512_add_epi64(sum, _mm512_add_epi64(lo, hi));
    }
    block_sums[start / kBlock] = _mm512_reduce_add_epi64(sum);
    total += block_sums[start / kBlock];
  }
  return total;
}

// y_i[0..n) += sum_r a_i[r] * b[r * ldb + 0..n) for rows i < R, as a register-blocked
// micro-kernel: R rows x 64 columns of y stay in registers over all ranks, and each vector of b
// is loaded once for the R rows.
template <int R>
PTP_AVX512 void rank_update(const float* const* a, int64_t rank, const float* b, int64_t ldb,
                            float* const* y, int64_t n) {
  for (int64_t c = 0; c < n; c += 64) {
    __mmask16 mask[4];
    __m512 acc[R][4];
    for (int j = 0; j < 4; ++j) {
      const int64_t remaining = n - c - 16 * j;
      mask[j] = remaining > 0 ? lanes(remaining) : 0;
      for (int i = 0; i < R; ++i) acc[i][j] = _mm512_maskz_loadu_ps(mask[j], y[i] + c + 16 * j);
    }
    for (int64_t r = 0; r < rank; ++r) {
      __m512 b_r[4];
      for (int j = 0; j < 4; ++j) b_r[j] = load16(b + r * ldb + c + 16 * j, mask[j]);
      for (int i = 0; i < R; ++i) {
        const __m512 a_ir = _mm512_set1_ps(a[i][r]);
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(a_ir, b_r[j], acc[i][j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y[i] + c + 16 * j, mask[j], acc[i][j]);
    }
  }
}

template <typename T>
PTP_AVX512 void to_float(const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(y + i, m, load16(x + i, m));
  }
}

// A whole panel row of 16 weights as float32 (panels are padded: no mask).
PTP_AVX512 inline __m512 panel_row(const c10::Half* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

PTP_AVX512 inline __m512 panel_row(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

// avx2::panel_gemm_tile with a panel's 16 columns in one vector per row. R rows give only R FMA
// chains, so even and odd k (and ranks of the update) accumulate apart: 2R chains hide the FMA
// latency, as the AVX2 tile's low and high halves do.
template <int R, typename W>
PTP_AVX512 void panel_gemm_tile(const float* x, int64_t ldx, const W* panel, const float* scales,
                                int64_t k_dim, const PanelUpdate& update, float* y, int64_t ldy,
                                int64_t columns) {
  __m512 even[R], odd[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) even[i] = odd[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 1 < k_dim; k += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + k * 16) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 w_even = panel_row(panel + k * 16), w_odd = panel_row(panel + k * 16 + 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      even[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w_even, even[i]);
      odd[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k + 1]), w_odd, odd[i]);
    }
  }
  if (k < k_dim) {
    const __m512 w_last = panel_row(panel + k * 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      even[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w_last, even[i]);
    }
  }
  if (scales != nullptr) {
    const __m512 scale = _mm512_loadu_ps(scales);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      even[i] = _mm512_mul_ps(even[i], scale);
      odd[i] = _mm512_mul_ps(odd[i], scale);
    }
  }
  for (int64_t r = 0; r < update.width; ++r) {
    const __m512 b = panel_row(update.b + r * 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      __m512& acc = r % 2 ? odd[i] : even[i];
      acc = _mm512_fmadd_ps(_mm512_set1_ps(update.xa[i * update.ld_xa + r]), b, acc);
    }
  }
  const __mmask16 m = lanes(columns);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + i * ldy, m, _mm512_add_ps(even[i], odd[i]));
}

// The drafter attention's primitives (DraftAttention in ops.cpp).
template <typename T>
struct Attention {
  static constexpr int64_t kValueDims = 64;  // dimensions per weighted_values call

  // scores[i][0..run) = queries[i] . keys of a run of consecutive slots of one block, for R
  // rows: 16 positions at a time, R accumulators in registers, each key vector loaded once.
  // keys: [head_dim, block_size] from the run's first slot on.
  template <int R>
  static PTP_AVX512 void score_rows(const float* queries, const T* keys, int64_t run,
                                    int64_t head_dim, int64_t block_size, float* scores,
                                    int64_t score_stride) {
    for (int64_t t = 0; t < run; t += 16) {
      const __mmask16 m = lanes(run - t);
      __m512 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < head_dim; ++d) {
        const __m512 k = load16(keys + d * block_size + t, m);
        for (int i = 0; i < R; ++i) {
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(queries[i * head_dim + d]), k, acc[i]);
        }
      }
      for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(scores + i * score_stride + t, m, acc[i]);
    }
  }

  static PTP_AVX512 float dot(const float* q, const T* k, int64_t head_dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 16) {
      const __mmask16 m = lanes(head_dim - d);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16(k + d, m), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }

  // row[0..width) = exp(row - max row), in place; returns their sum.
  static PTP_AVX512 float softmax(float* row, int64_t width) {
    const __m512 floor = _mm512_set1_ps(ptp::kMinExponent);
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 m = lanes(width - i);
      best = _mm512_mask_max_ps(best, m, best, _mm512_maskz_loadu_ps(m, row + i));
    }
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 m = lanes(width - i);
      const __m512 x = _mm512_maskz_loadu_ps(m, row + i);
      // Scores below the row maximum by more than -kMinExponent (and -inf) weigh 0.
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, _mm512_sub_ps(x, max), floor, _CMP_GE_OQ);
      const __m512 e = _mm512_maskz_mov_ps(keep, exp_nonpositive(
          _mm512_max_ps(_mm512_sub_ps(x, max), floor)));
      _mm512_mask_storeu_ps(row + i, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }

  // out[i][0..64) (i < R, 64 dims from dim d0, masked past head_dim) = sum over the positions j
  // of p[i][j] * value(j)[d0..], the accumulators held in registers. values[j] is position j's
  // value row (nullptr: a zero value).
  template <int R>
  static PTP_AVX512 void weighted_values(const float* const* p, const T* const* values,
                                         int64_t count, int64_t head_dim, int64_t d0,
                                         float* const* out) {
    __mmask16 mask[4];
    __m512 acc[R][4];
    for (int c = 0; c < 4; ++c) {
      const int64_t remaining = head_dim - d0 - 16 * c;
      mask[c] = remaining > 0 ? lanes(remaining) : 0;
      for (int i = 0; i < R; ++i) acc[i][c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < count; ++j) {
      if (values[j] == nullptr) continue;
      __m512 v[4];
      for (int c = 0; c < 4; ++c) v[c] = load16(values[j] + d0 + 16 * c, mask[c]);
      for (int i = 0; i < R; ++i) {
        const __m512 weight = _mm512_set1_ps(p[i][j]);
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(weight, v[c], acc[i][c]);
      }
    }
    for (int i = 0; i < R; ++i) {
      for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(out[i] + d0 + 16 * c, mask[c], acc[i][c]);
    }
  }
};

}  // namespace ptp::cpu::avx512
