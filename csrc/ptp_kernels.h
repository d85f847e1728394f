// Kernel logic shared by the CPU extension, the CUDA extension and the host emulation of the
// CUDA grid: raw pointers, no torch, every function callable on host and device.
//
// Exactness contract with the torch reference (vllm_ptp/sampling.py, vllm_ptp/rng.py): every
// float operation below is a single IEEE-rounded op in a fixed order (no FMA contraction: the
// device uses __fmul_rn/__fadd_rn, the host is built with -ffp-contract=off), and everything
// after the exponential is exact integer arithmetic, which any summation order reproduces.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define PTP_HD __host__ __device__ __forceinline__
#else
#define PTP_HD inline
#endif

// Templates instantiated with device-only callables (the CUDA Block) or host-only ones.
#ifdef __CUDACC__
#define PTP_BLOCK_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define PTP_BLOCK_TEMPLATE
#endif

namespace ptp {

// ---- Philox4x32-10: u(seed, position) -------------------------------------------------------

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kGreedyU = -1.0f;  // marks greedy requests in the u-embedding

// First output word of Philox4x32-10 with counter (position, 0) and key seed.
PTP_HD uint32_t philox_word0(uint64_t seed, uint64_t position) {
  uint32_t c0 = static_cast<uint32_t>(position), c1 = static_cast<uint32_t>(position >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c0;
}

// Top 24 bits / 2^24: exact in float32, so u < 1.
PTP_HD float uniform(int64_t seed, int64_t position) {
  const uint32_t word = philox_word0(static_cast<uint64_t>(seed), static_cast<uint64_t>(position));
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

// ---- u-embedding: interpolation between learned vectors ---------------------------------------

struct Lerp {
  int64_t lower, upper;
  float frac;
};

PTP_HD Lerp lerp_of(float u, int64_t num_vectors) {
  const float clamped = u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u);
#ifdef __CUDA_ARCH__
  const float scaled = __fmul_rn(clamped, static_cast<float>(num_vectors - 1));
  int64_t lower = static_cast<int64_t>(floorf(scaled));
#else
  const float scaled = clamped * static_cast<float>(num_vectors - 1);
  int64_t lower = static_cast<int64_t>(__builtin_floorf(scaled));
#endif
  lower = lower > num_vectors - 1 ? num_vectors - 1 : lower;
  const int64_t upper = lower + 1 > num_vectors - 1 ? num_vectors - 1 : lower + 1;
  return {lower, upper, scaled - static_cast<float>(lower)};
}

PTP_HD float lerp(float low, float high, float frac) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(low, __fmul_rn(frac, __fsub_rn(high, low)));
#else
  return low + frac * (high - low);
#endif
}

// ---- Sampling weights: fixed-point exp((x - max) / T) ------------------------------------------

// Weights are floor(e * 2^40) with e = exp(d) in (0, 1]: integers, so totals, prefix sums and the
// top-p mass are exact in any order. Tokens below 2^-40 of the top token weigh 0.
constexpr int kWeightBits = 40;
constexpr float kWeightScale = 1099511627776.0f;  // 2^40
constexpr float kMinExponent = -64.0f;            // d below this (or -inf / NaN) weighs 0
constexpr int kIdBits = 23;                       // keys pack (weight, token id): vocab < 2^23
constexpr int64_t kMaxVocab = int64_t{1} << kIdBits;

// Written as exact float32 decimals so the torch reference parses the same constants.
constexpr float kLog2e = 1.44269502f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -0.000212194442f;
constexpr float kC2 = 0.5f;
constexpr float kC3 = 0.166666672f;
constexpr float kC4 = 0.0416666679f;
constexpr float kC5 = 0.00833333377f;
constexpr float kC6 = 0.00138888892f;

PTP_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PTP_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PTP_HD float round_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return __builtin_rintf(x);  // default rounding mode: to nearest, ties to even
#endif
}

// The bits of a value as another type of the same size (std::bit_cast, on host and device).
template <typename To, typename From>
PTP_HD To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To out;
  __builtin_memcpy(&out, &x, sizeof(out));
  return out;
}

PTP_HD float pow2(int n) {  // 2^n for n in [-126, 127]
  return bit_cast<float>(static_cast<uint32_t>(n + 127) << 23);
}

// exp(d) for d in [kMinExponent, 0]: Cody-Waite reduction and a degree-6 Taylor polynomial
// (relative error ~1e-7), one rounded op at a time.
PTP_HD float exp_nonpositive(float d) {
  const float n = round_even(fmul(d, kLog2e));
  const float r = fadd(fadd(d, -fmul(n, kLn2Hi)), -fmul(n, kLn2Lo));
  float p = kC6;
  p = fadd(fmul(p, r), kC5);
  p = fadd(fmul(p, r), kC4);
  p = fadd(fmul(p, r), kC3);
  p = fadd(fmul(p, r), kC2);
  p = fadd(fmul(p, r), 1.0f);
  p = fadd(fmul(p, r), 1.0f);
  return fmul(p, pow2(static_cast<int>(n)));
}

struct RowParams {
  float inv_temperature;  // fl(1 / T)
  float max_scaled;       // fl(max(x) * inv_temperature) = max of the scaled logits
  float min_p;            // e < min_p weighs 0 (e of the top token is exactly 1)
};

PTP_HD int64_t weight_of(float logit, const RowParams& p) {
  const float d = fadd(fmul(logit, p.inv_temperature), -p.max_scaled);
  if (!(d >= kMinExponent)) return 0;
  const float e = exp_nonpositive(d);
  if (e < p.min_p) return 0;
  return static_cast<int64_t>(fmul(e, kWeightScale));
}

// Ranking key: weight descending, then token id ascending (a stable sort's order), all distinct.
PTP_HD uint64_t key_of(int64_t weight, int64_t token) {
  return (static_cast<uint64_t>(weight) << kIdBits) | static_cast<uint64_t>(kMaxVocab - 1 - token);
}

// floor(x * total) for float32 x in [0, 1) and 0 <= total < 2^63, exactly; `inexact` tells
// whether x * total was not an integer. x = mant * 2^-s with s >= 24 and total split at bit 24
// keep every product within 63 bits.
PTP_HD int64_t scaled_floor(float x, int64_t total, bool* inexact) {
  const uint32_t bits = bit_cast<uint32_t>(x);
  const int exponent = static_cast<int>((bits >> 23) & 0xFF);
  int64_t mant = bits & 0x7FFFFF;
  int shift = 149 - 24;
  if (exponent != 0) {
    mant |= int64_t{1} << 23;
    shift = 150 - exponent - 24;
  }
  shift = shift < 0 ? 0 : (shift > 63 ? 63 : shift);
  const int64_t low = mant * (total & 0xFFFFFF);
  const int64_t high = mant * (total >> 24) + (low >> 24);
  const int64_t floor = high >> shift;
  *inexact = (low & 0xFFFFFF) != 0 || high - (floor << shift) != 0;
  return floor;
}

// Sampling threshold: the token is the first whose prefix weight exceeds floor(u * total).
PTP_HD int64_t sample_threshold(float u, int64_t total) {
  bool inexact;
  return scaled_floor(u, total, &inexact);
}

// Top-p: a token (ranked by key) is kept while the mass ranked before it is < top_p * total,
// i.e. < this bound; at least 1 so the top token is always kept.
PTP_HD int64_t nucleus_bound(float top_p, int64_t total) {
  bool inexact;
  const int64_t floor = scaled_floor(top_p, total, &inexact);
  const int64_t ceil = floor + (inexact ? 1 : 0);
  return ceil < 1 ? 1 : ceil;
}

// ---- Coupled verification -------------------------------------------------------------------

// Writes the request's emitted tokens (target samples up to and including the first mismatch)
// into out[0..max_k], PLACEHOLDER (-1) after them, unless out is null; returns the number of
// accepted drafts. `target(j)` samples the target at draft position j (j == num_drafts is the
// bonus); it is called only for the positions that are emitted.
PTP_BLOCK_TEMPLATE
template <typename SampleFn>
PTP_HD int64_t verify_request(const int64_t* drafts, int64_t num_drafts, int64_t max_k,
                              int64_t* out, SampleFn target) {
  int64_t accepted = 0;
  for (; accepted <= num_drafts; ++accepted) {
    const int64_t token = target(accepted);
    if (out) out[accepted] = token;
    if (accepted == num_drafts || token != drafts[accepted]) break;
  }
  for (int64_t j = accepted + 1; out && j <= max_k; ++j) out[j] = -1;
  return accepted;
}

// ---- Paged KV-cache slots -------------------------------------------------------------------

// Slot of token `position` of a request whose block-table row is `blocks` (width num_blocks);
// -1 past the table.
PTP_HD int64_t paged_slot(const int32_t* blocks, int64_t num_blocks, int64_t block_size,
                          int64_t position) {
  const int64_t block = position / block_size;
  if (position < 0 || block >= num_blocks) return -1;
  return static_cast<int64_t>(blocks[block]) * block_size + position % block_size;
}

// ---- One logits row sampled by a block of cooperating threads --------------------------------

// The CUDA kernel and its host emulation run this with different Block types. A Block has
// size() and gather_i64 / gather_f32(f): every thread t computes f(t) and all threads get all
// results (a shared-memory exchange on the device, a loop on the host). Each thread owns one
// contiguous chunk of the vocabulary, so per-thread sums in thread order are prefix-sum order.
PTP_HD void chunk_of(int64_t vocab, int thread, int num_threads, int64_t* begin, int64_t* end) {
  const int64_t size = (vocab + num_threads - 1) / num_threads;
  *begin = thread * size < vocab ? thread * size : vocab;
  *end = *begin + size < vocab ? *begin + size : vocab;
}

struct SamplingParams {
  float temperature, top_p, min_p, u;
  int64_t top_k;
};

// Per-row sampling settings of a batch of logits rows (one array each, indexed by row).
struct SamplingRows {
  const float *temperature, *top_p, *min_p, *u;
  const int64_t* top_k;

  PTP_HD SamplingParams operator[](int64_t row) const {
    return {temperature[row], top_p[row], min_p[row], u[row], top_k[row]};
  }
};

constexpr float kGreedyTemperature = 1e-5f;  // sampling.GREEDY_TEMPERATURE

PTP_BLOCK_TEMPLATE
template <typename T, typename Block>
PTP_HD int64_t block_argmax(Block& block, const T* x, int64_t vocab, float* max_out) {
  const int n = block.size();
  const float* maxima = block.gather_f32([&](int t) {
    int64_t begin, end;
    chunk_of(vocab, t, n, &begin, &end);
    float best = bit_cast<float>(0xFF800000u);  // -inf
    for (int64_t i = begin; i < end; ++i) {
      const float v = static_cast<float>(x[i]);
      best = v > best ? v : best;
    }
    return best;
  });
  float best = maxima[0];
  for (int t = 1; t < n; ++t) best = maxima[t] > best ? maxima[t] : best;
  const int64_t* first = block.gather_i64([&](int t) {
    int64_t begin, end;
    chunk_of(vocab, t, n, &begin, &end);
    for (int64_t i = begin; i < end; ++i) {
      if (static_cast<float>(x[i]) == best) return i;
    }
    return vocab;
  });
  int64_t token = vocab;
  for (int t = 0; t < n; ++t) token = first[t] < token ? first[t] : token;
  *max_out = best;
  return token < vocab ? token : 0;  // all-NaN rows: token 0, like torch.argmax of -inf rows
}

// Sum over all threads of f(t) (exact: integers).
PTP_BLOCK_TEMPLATE
template <typename Block, typename F>
PTP_HD int64_t block_sum(Block& block, F f) {
  const int64_t* parts = block.gather_i64(f);
  int64_t total = 0;
  for (int t = 0; t < block.size(); ++t) total += parts[t];
  return total;
}

// Smallest t in [low, UINT64_MAX] with pred(t); pred is monotone and true at UINT64_MAX.
// Every thread of the block runs the same bisection (the reductions give all threads the same
// values), 64 steps at most.
PTP_BLOCK_TEMPLATE
template <typename Pred>
PTP_HD uint64_t bisect_keys(uint64_t low, Pred pred) {
  uint64_t high = ~uint64_t{0};
  while (low < high) {
    const uint64_t mid = low + (high - low) / 2;
    if (pred(mid)) {
      high = mid;
    } else {
      low = mid + 1;
    }
  }
  return low;
}

// F^-1(u) of one row under temperature -> min-p -> top-k -> top-p, or its argmax for greedy
// rows: the token the torch reference (sampling.sample) draws.
PTP_BLOCK_TEMPLATE
template <typename T, typename Block>
PTP_HD int64_t block_sample_row(Block& block, const T* x, int64_t vocab, SamplingParams s) {
  float max_logit;
  const int64_t argmax = block_argmax(block, x, vocab, &max_logit);
  if (s.temperature < kGreedyTemperature) return argmax;
  RowParams p;
#ifdef __CUDA_ARCH__
  p.inv_temperature = __frcp_rn(s.temperature);
#else
  p.inv_temperature = 1.0f / s.temperature;
#endif
  p.max_scaled = fmul(max_logit, p.inv_temperature);
  p.min_p = s.min_p;
  const int n = block.size();
  // Kept tokens have key >= min_key; min_key = 0 keeps all.
  auto mass_above = [&](uint64_t threshold, bool count_only) {
    return block_sum(block, [&](int t) {
      int64_t begin, end, acc = 0;
      chunk_of(vocab, t, n, &begin, &end);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t w = weight_of(static_cast<float>(x[i]), p);
        if (w > 0 && key_of(w, i) > threshold) acc += count_only ? 1 : w;
      }
      return acc;
    });
  };
  uint64_t min_key = 0;
  if (s.top_k > 0 && s.top_k < vocab) {
    min_key = bisect_keys(0, [&](uint64_t t) { return mass_above(t, true) < s.top_k; });
  }
  if (s.top_p < 1.0f) {
    // Mass of the tokens top-k kept (keys >= min_key; every key of a weighted token is > 0).
    const int64_t bound = nucleus_bound(s.top_p, mass_above(min_key ? min_key - 1 : 0, false));
    min_key = bisect_keys(min_key, [&](uint64_t t) { return mass_above(t, false) < bound; });
  }
  const int64_t* sums = block.gather_i64([&](int t) {
    int64_t begin, end, acc = 0;
    chunk_of(vocab, t, n, &begin, &end);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t w = weight_of(static_cast<float>(x[i]), p);
      if (w > 0 && key_of(w, i) >= min_key) acc += w;
    }
    return acc;
  });
  int64_t total = 0;
  for (int t = 0; t < n; ++t) total += sums[t];
  if (total == 0) return argmax;
  const int64_t threshold = sample_threshold(s.u, total);
  int64_t before = 0;
  int chunk = 0;
  while (before + sums[chunk] <= threshold) before += sums[chunk++];
  int64_t begin, end;
  chunk_of(vocab, chunk, n, &begin, &end);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t w = weight_of(static_cast<float>(x[i]), p);
    if (w > 0 && key_of(w, i) >= min_key) {
      before += w;
      if (before > threshold) return i;
    }
  }
  return end - 1;  // unreachable: the chunk's sum exceeds the threshold
}

}  // namespace ptp
