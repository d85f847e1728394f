// CPU kernels of the PTP auxiliary-variable path, registered as torch ops (namespace vllm_ptp).
// The per-row vocabulary passes have an AVX-512 path chosen at run time and a scalar fallback;
// both compute exactly the values of ptp_kernels.h, so the choice never changes a token.
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "../op_checks.h"

namespace {

using ptp::RowParams;
using ptp::SamplingParams;
using ptp::dispatch_float;

constexpr int64_t kBlock = 256;  // tokens per prefix-sum block of the search
#define PTP_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// ---- scalar fallback ----------------------------------------------------------------------------

template <typename T>
float row_max_scalar(const T* x, int64_t n) {
  float best = -INFINITY;
  for (int64_t i = 0; i < n; ++i) best = std::max(best, static_cast<float>(x[i]));
  return best;
}

template <typename T>
int64_t first_equal_scalar(const T* x, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<float>(x[i]) == value) return i;
  }
  return n;
}

// Weights of a row into w (nullable) and per-kBlock sums; returns the total.
template <typename T>
int64_t weights_scalar(const T* x, int64_t n, const RowParams& p, int64_t* block_sums,
                       int64_t* w) {
  int64_t total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    int64_t sum = 0;
    for (int64_t i = start; i < std::min(n, start + kBlock); ++i) {
      const int64_t weight = ptp::weight_of(static_cast<float>(x[i]), p);
      if (w) w[i] = weight;
      sum += weight;
    }
    block_sums[start / kBlock] = sum;
    total += sum;
  }
  return total;
}

// ---- AVX-512 ------------------------------------------------------------------------------------

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
PTP_AVX512 float row_max_avx512(const T* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    best = _mm512_mask_max_ps(best, m, best, load16(x + i, m));
  }
  return _mm512_reduce_max_ps(best);
}

template <typename T>
PTP_AVX512 int64_t first_equal_avx512(const T* x, int64_t n, float value) {
  const __m512 target = _mm512_set1_ps(value);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16(x + i, m), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return n;
}

// The op sequence of ptp::weight_of, 16 lanes at a time.
template <typename T>
PTP_AVX512 int64_t weights_avx512(const T* x, int64_t n, const RowParams& p, int64_t* block_sums,
                                  int64_t* w) {
  const __m512 inv_t = _mm512_set1_ps(p.inv_temperature), max_s = _mm512_set1_ps(p.max_scaled);
  const __m512 min_d = _mm512_set1_ps(ptp::kMinExponent), min_p = _mm512_set1_ps(p.min_p);
  const __m512 log2e = _mm512_set1_ps(ptp::kLog2e), ln2_hi = _mm512_set1_ps(ptp::kLn2Hi);
  const __m512 ln2_lo = _mm512_set1_ps(ptp::kLn2Lo), one = _mm512_set1_ps(1.0f);
  const __m512 scale = _mm512_set1_ps(ptp::kWeightScale);
  const __m512 c[] = {_mm512_set1_ps(ptp::kC6), _mm512_set1_ps(ptp::kC5),
                      _mm512_set1_ps(ptp::kC4), _mm512_set1_ps(ptp::kC3),
                      _mm512_set1_ps(ptp::kC2), one, one};
  int64_t total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = start; i < std::min(n, start + kBlock); i += 16) {
      const __mmask16 m = lanes(n - i);
      const __m512 d = _mm512_sub_ps(_mm512_mul_ps(load16(x + i, m), inv_t), max_s);
      __mmask16 valid = _mm512_mask_cmp_ps_mask(m, d, min_d, _CMP_GE_OQ);
      const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(d, log2e),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_sub_ps(d, _mm512_mul_ps(k, ln2_hi));
      r = _mm512_sub_ps(r, _mm512_mul_ps(k, ln2_lo));
      __m512 poly = c[0];
      for (int j = 1; j < 7; ++j) poly = _mm512_add_ps(_mm512_mul_ps(poly, r), c[j]);
      const __m512i exponent = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
      const __m512 e = _mm512_mul_ps(poly, _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23)));
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

// ---- dispatch -----------------------------------------------------------------------------------

bool avx512_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

// "avx512" or "scalar"; VLLM_PTP_CPU_ISA=scalar forces the fallback.
std::string& active_isa() {
  static std::string isa = [] {
    const char* forced = std::getenv("VLLM_PTP_CPU_ISA");
    if (forced && std::string(forced) == "scalar") return std::string("scalar");
    return std::string(avx512_supported() ? "avx512" : "scalar");
  }();
  return isa;
}

template <typename T>
struct RowKernels {
  float (*row_max)(const T*, int64_t);
  int64_t (*first_equal)(const T*, int64_t, float);
  int64_t (*weights)(const T*, int64_t, const RowParams&, int64_t*, int64_t*);

  static RowKernels get() {
    if (active_isa() == "avx512") {
      return {row_max_avx512<T>, first_equal_avx512<T>, weights_avx512<T>};
    }
    return {row_max_scalar<T>, first_equal_scalar<T>, weights_scalar<T>};
  }
};

// ---- one row ------------------------------------------------------------------------------------

struct Scratch {
  std::vector<int64_t> block_sums, weights;
  std::vector<uint64_t> keys;
};

int64_t weight_of_key(uint64_t key) { return static_cast<int64_t>(key >> ptp::kIdBits); }

// Smallest key of the nucleus: keys[0..n) unordered and distinct, a token is kept while the mass
// ranked before it is < bound. A quickselect weighted by mass, O(n) expected, no sort.
uint64_t nucleus_min_key(uint64_t* keys, int64_t n, int64_t bound) {
  int64_t lo = 0, hi = n, before = 0;  // keys[0..lo) are kept, keys[hi..n) are not
  uint64_t smallest_kept = keys[0];
  while (lo < hi) {
    const uint64_t pivot = keys[lo + (hi - lo) / 2];
    uint64_t* mid = std::partition(keys + lo, keys + hi, [&](uint64_t k) { return k > pivot; });
    std::iter_swap(mid, std::find(mid, keys + hi, pivot));
    int64_t upper = 0;
    for (uint64_t* k = keys + lo; k < mid; ++k) upper += weight_of_key(*k);
    if (before + upper < bound) {  // the pivot, and all above it, are kept
      before += upper + weight_of_key(pivot);
      smallest_kept = pivot;
      lo = mid - keys + 1;
    } else {
      hi = mid - keys;
    }
  }
  return smallest_kept;
}

template <typename T>
int64_t sample_row(const T* x, int64_t vocab, const SamplingParams& s, const RowKernels<T>& k,
                   Scratch& scratch) {
  const float max_logit = k.row_max(x, vocab);
  int64_t argmax = k.first_equal(x, vocab, max_logit);
  argmax = argmax < vocab ? argmax : 0;
  if (s.temperature < ptp::kGreedyTemperature) return argmax;
  RowParams p;
  p.inv_temperature = 1.0f / s.temperature;
  p.max_scaled = max_logit * p.inv_temperature;
  p.min_p = s.min_p;
  const bool top_k = s.top_k > 0 && s.top_k < vocab, top_p = s.top_p < 1.0f;
  scratch.block_sums.resize((vocab + kBlock - 1) / kBlock);
  int64_t* sums = scratch.block_sums.data();
  uint64_t min_key = 0;  // kept tokens: weight > 0 and key >= min_key
  int64_t* w = nullptr;
  int64_t total;
  if (!top_k && !top_p) {
    total = k.weights(x, vocab, p, sums, nullptr);
  } else {
    scratch.weights.resize(vocab);
    w = scratch.weights.data();
    k.weights(x, vocab, p, sums, w);
    // Weights by bit length: everything above the bucket where the top-k count or the top-p
    // mass is reached is kept, everything below dropped; only candidates from that bucket up
    // are ranked.
    int64_t count[ptp::kWeightBits + 2] = {}, mass[ptp::kWeightBits + 2] = {};
    for (int64_t i = 0; i < vocab; ++i) {
      const int bucket = w[i] > 0 ? 64 - __builtin_clzll(static_cast<uint64_t>(w[i])) : 0;
      count[bucket] += 1;
      mass[bucket] += w[i];
    }
    int lowest = ptp::kWeightBits + 1;  // candidates: weights with at least this bit length
    if (top_k) {
      for (int64_t seen = 0; lowest > 1 && seen + count[lowest] < s.top_k; --lowest) {
        seen += count[lowest];
      }
    } else {
      int64_t total_mass = 0, above = 0;
      for (int b = 1; b <= ptp::kWeightBits + 1; ++b) total_mass += mass[b];
      const int64_t bound = ptp::nucleus_bound(s.top_p, total_mass);
      for (; lowest > 1 && above + mass[lowest] < bound; --lowest) above += mass[lowest];
    }
    const int64_t min_weight = int64_t{1} << (lowest - 1);
    min_key = static_cast<uint64_t>(min_weight) << ptp::kIdBits;  // no token below the buckets
    std::vector<uint64_t>& keys = scratch.keys;
    keys.clear();
    for (int64_t i = 0; i < vocab; ++i) {
      if (w[i] >= min_weight) keys.push_back(ptp::key_of(w[i], i));
    }
    int64_t n = static_cast<int64_t>(keys.size());
    if (n == 0) return argmax;
    if (top_k && s.top_k < n) {
      std::nth_element(keys.begin(), keys.begin() + s.top_k - 1, keys.end(),
                       std::greater<uint64_t>());
      n = s.top_k;
      min_key = keys[n - 1];
    }
    if (top_p) {
      // The nucleus bound is a share of the mass top-k kept (all of it without top-k).
      int64_t kept_mass = 0;
      if (top_k) {
        for (int64_t i = 0; i < n; ++i) kept_mass += weight_of_key(keys[i]);
      } else {
        for (int b = 1; b <= ptp::kWeightBits + 1; ++b) kept_mass += mass[b];
      }
      min_key = nucleus_min_key(keys.data(), n, ptp::nucleus_bound(s.top_p, kept_mass));
    }
    total = 0;
    for (int64_t b = 0; b * kBlock < vocab; ++b) {
      int64_t sum = 0;
      for (int64_t i = b * kBlock; i < std::min(vocab, (b + 1) * kBlock); ++i) {
        if (w[i] > 0 && ptp::key_of(w[i], i) >= min_key) sum += w[i];
      }
      sums[b] = sum;
      total += sum;
    }
  }
  if (total == 0) return argmax;
  const int64_t threshold = ptp::sample_threshold(s.u, total);
  int64_t before = 0, block = 0;
  while (before + sums[block] <= threshold) before += sums[block++];
  const int64_t end = std::min(vocab, (block + 1) * kBlock);
  for (int64_t i = block * kBlock; i < end; ++i) {
    const int64_t weight = w ? w[i] : ptp::weight_of(static_cast<float>(x[i]), p);
    if (weight > 0 && ptp::key_of(weight, i) >= min_key) {
      before += weight;
      if (before > threshold) return i;
    }
  }
  return end - 1;  // unreachable: the block's sum exceeds the threshold
}

// ---- ops ----------------------------------------------------------------------------------------

// Calls fn(row_sampler) with row_sampler(row) -> token for the logits dtype.
template <typename Fn>
void with_row_sampler(const at::Tensor& logits, const ptp::SamplingRows& rows, Fn fn) {
  dispatch_float(logits.scalar_type(), "logits", [&](auto type) {
    using scalar_t = decltype(type);
    const scalar_t* data = logits.data_ptr<scalar_t>();
    const int64_t vocab = logits.size(1), stride = logits.stride(0);
    const RowKernels<scalar_t> kernels = RowKernels<scalar_t>::get();
    fn([&, data, vocab, stride](int64_t row) {
      thread_local Scratch scratch;
      return sample_row(data + row * stride, vocab, rows[row], kernels, scratch);
    });
  });
}

at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& u) {
  const ptp::SamplingRows rows =
      ptp::check_rows(at::kCPU, logits, temperature, top_k, top_p, min_p, u);
  const int64_t num_rows = logits.size(0);
  at::Tensor tokens = at::empty({num_rows}, logits.options().dtype(at::kLong));
  int64_t* out = tokens.data_ptr<int64_t>();
  with_row_sampler(logits, rows, [&](auto sample_one) {
#pragma omp parallel for schedule(dynamic) num_threads(at::get_num_threads()) if (num_rows > 1)
    for (int64_t row = 0; row < num_rows; ++row) out[row] = sample_one(row);
  });
  return tokens;
}

// Rows are grouped per request: its num_drafts draft positions, then its bonus position.
std::tuple<at::Tensor, at::Tensor> sample_and_verify(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& u,
    const at::Tensor& draft_tokens, const at::Tensor& num_drafts) {
  const ptp::SamplingRows rows =
      ptp::check_rows(at::kCPU, logits, temperature, top_k, top_p, min_p, u);
  ptp::check_drafts(draft_tokens, num_drafts);
  const int64_t batch = draft_tokens.size(0), max_k = draft_tokens.size(1);
  const int64_t* n = num_drafts.data_ptr<int64_t>();
  std::vector<int64_t> first_row(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(n[b] >= 0 && n[b] <= max_k, "num_drafts out of range");
    first_row[b + 1] = first_row[b] + n[b] + 1;
  }
  TORCH_CHECK(first_row[batch] == logits.size(0), "logits rows must be sum(num_drafts + 1)");
  at::Tensor output = at::empty({batch, max_k + 1}, draft_tokens.options());
  at::Tensor accepted = at::empty({batch}, draft_tokens.options());
  int64_t *out = output.data_ptr<int64_t>(), *acc = accepted.data_ptr<int64_t>();
  const int64_t* drafts = draft_tokens.data_ptr<int64_t>();
  with_row_sampler(logits, rows, [&](auto sample_one) {
#pragma omp parallel for schedule(dynamic) num_threads(at::get_num_threads()) if (batch > 1)
    for (int64_t b = 0; b < batch; ++b) {
      acc[b] = ptp::verify_request(drafts + b * max_k, n[b], max_k, out + b * (max_k + 1),
                                   [&](int64_t j) { return sample_one(first_row[b] + j); });
    }
  });
  return {output, accepted};
}

at::Tensor uniforms(const at::Tensor& seeds, const at::Tensor& positions) {
  TORCH_CHECK(seeds.sizes() == positions.sizes(), "seeds and positions must have one shape");
  const at::Tensor s = seeds.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous();
  at::Tensor u = at::empty(s.sizes(), s.options().dtype(at::kFloat));
  const int64_t *sd = s.data_ptr<int64_t>(), *pd = p.data_ptr<int64_t>();
  float* ud = u.data_ptr<float>();
  const int64_t n = s.numel();
#pragma omp parallel for num_threads(at::get_num_threads()) if (n > 4096)
  for (int64_t i = 0; i < n; ++i) ud[i] = ptp::uniform(sd[i], pd[i]);
  return u;
}

template <typename W, typename O>
void write_u_rows(O* out, int64_t stride0, int64_t stride1, int64_t first_slot, int64_t num,
                  int64_t steps, int64_t hidden, const W* weight, int64_t num_vectors,
                  const W* greedy_vector, const int64_t* seeds, const int64_t* positions,
                  const bool* greedy) {
#pragma omp parallel for collapse(2) num_threads(at::get_num_threads()) if (num * steps > 8)
  for (int64_t i = 0; i < num; ++i) {
    for (int64_t j = 0; j < steps; ++j) {
      O* row = out + i * stride0 + (first_slot + j) * stride1;
      const float u = greedy[i] ? ptp::kGreedyU : ptp::uniform(seeds[i], positions[i] + j);
      if (u < 0.0f || num_vectors == 1) {
        const W* src = u < 0.0f ? greedy_vector : weight;
        for (int64_t h = 0; h < hidden; ++h) row[h] = static_cast<O>(src[h]);
        continue;
      }
      const ptp::Lerp l = ptp::lerp_of(u, num_vectors);
      const W *low = weight + l.lower * hidden, *high = weight + l.upper * hidden;
      for (int64_t h = 0; h < hidden; ++h) {
        // Rounded to the weight's dtype first, as the reference's .to(weight.dtype).
        const W v(ptp::lerp(static_cast<float>(low[h]), static_cast<float>(high[h]), l.frac));
        row[h] = static_cast<O>(v);
      }
    }
  }
}

// out[n, first_slot + j] = embedding of u(seeds[n], positions[n] + j), or the greedy vector.
void write_u_embeddings(const at::Tensor& out, int64_t first_slot, const at::Tensor& weight,
                        const at::Tensor& greedy_vector, const at::Tensor& seeds,
                        const at::Tensor& positions, const at::Tensor& greedy) {
  TORCH_CHECK(out.dim() == 3 && out.stride(2) == 1, "out must be [N, slots, hidden]");
  const int64_t num = out.size(0), hidden = out.size(2), steps = out.size(1) - first_slot;
  TORCH_CHECK(first_slot >= 0 && steps >= 0, "first_slot out of range");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden && weight.is_contiguous(),
              "weight must be contiguous [num_vectors, hidden]");
  TORCH_CHECK(greedy_vector.numel() == hidden && greedy_vector.scalar_type() ==
              weight.scalar_type() && greedy_vector.is_contiguous(), "bad greedy_vector");
  TORCH_CHECK(seeds.numel() == num && positions.numel() == num && greedy.numel() == num &&
              greedy.scalar_type() == at::kBool, "seeds, positions, greedy must be [N]");
  const at::Tensor s = seeds.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous();
  const at::Tensor g = greedy.contiguous();
  const int64_t *sd = s.data_ptr<int64_t>(), *pd = p.data_ptr<int64_t>();
  const bool* gd = g.data_ptr<bool>();
  const int64_t num_vectors = weight.size(0);
  dispatch_float(weight.scalar_type(), "u-embedding weight", [&](auto w_type) {
    dispatch_float(out.scalar_type(), "out", [&](auto o_type) {
      write_u_rows(out.data_ptr<decltype(o_type)>(), out.stride(0), out.stride(1), first_slot,
                   num, steps, hidden, weight.data_ptr<decltype(w_type)>(), num_vectors,
                   greedy_vector.data_ptr<decltype(w_type)>(), sd, pd, gd);
    });
  });
}

// KV-cache slots of positions start[n] + j (j < num_positions) of the requests in rows
// batch_index of the block table; -1 past the table.
at::Tensor paged_slots(const at::Tensor& block_table, const at::Tensor& batch_index,
                       const at::Tensor& start, int64_t num_positions, int64_t block_size) {
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt &&
              block_table.stride(1) == 1, "block_table must be int32 [rows, blocks]");
  TORCH_CHECK(batch_index.numel() == start.numel(), "batch_index and start must be [N]");
  TORCH_CHECK(block_size > 0 && num_positions >= 0, "bad block_size or num_positions");
  const at::Tensor idx = batch_index.to(at::kLong).contiguous();
  const at::Tensor st = start.to(at::kLong).contiguous();
  const int64_t num = idx.numel(), num_blocks = block_table.size(1);
  at::Tensor slots = at::empty({num, num_positions}, idx.options());
  const int64_t *id = idx.data_ptr<int64_t>(), *sd = st.data_ptr<int64_t>();
  int64_t* out = slots.data_ptr<int64_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t i = 0; i < num; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < block_table.size(0), "batch_index out of range");
    const int32_t* blocks = table + id[i] * block_table.stride(0);
    for (int64_t j = 0; j < num_positions; ++j) {
      out[i * num_positions + j] = ptp::paged_slot(blocks, num_blocks, block_size, sd[i] + j);
    }
  }
  return slots;
}

// Context K/V of N requests in one layer, gathered from vLLM's paged CPU KV cache into keys and
// values [N, kv_heads, length, head_dim] (length >= positions). The cache is [blocks, kv_heads,
// block_size, 2 * head_dim]: per block and head the keys dimension-major ([head_dim,
// block_size]), then the values ([block_size, head_dim]). Slot -1 (past the block table) reads
// as zeros; positions past the slots are left as they are (room for the pass's own rows). The
// outputs are the caller's, reused from layer to layer and pass to pass: a fresh buffer costs
// more in page faults than the copy itself.
void gather_paged_kv(const at::Tensor& cache, const at::Tensor& slots, at::Tensor& keys,
                     at::Tensor& values) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(3) % 2 == 0 && cache.is_contiguous() &&
              cache.device().is_cpu(), "cache must be a contiguous CPU tensor [blocks, kv_heads, "
              "block_size, 2 * head_dim]");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be contiguous int64 [N, positions]");
  const int64_t num = slots.size(0), positions = slots.size(1);
  const int64_t num_blocks = cache.size(0), heads = cache.size(1), block_size = cache.size(2);
  const int64_t head_dim = cache.size(3) / 2;
  for (const at::Tensor* out : {&keys, &values}) {
    TORCH_CHECK(out->dim() == 4 && out->size(0) == num && out->size(1) == heads &&
                out->size(2) >= positions && out->size(3) == head_dim && out->is_contiguous() &&
                out->scalar_type() == cache.scalar_type(),
                "keys and values must be contiguous [N, kv_heads, >= positions, head_dim] in the "
                "cache's dtype");
  }
  const int64_t length = keys.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK(slot[i] >= -1 && slot[i] < num_blocks * block_size, "slot ", slot[i],
                " outside the cache of ", num_blocks * block_size, " slots");
  }
  dispatch_float(cache.scalar_type(), "cache", [&](auto type) {
    using T = decltype(type);
    const T* cache_data = cache.data_ptr<T>();
    T* key_out = keys.data_ptr<T>();
    T* value_out = values.data_ptr<T>();
    const int64_t head_stride = 2 * block_size * head_dim, block_stride = heads * head_stride;
    // One task per (request, head): its positions are one contiguous output run.
    at::parallel_for(0, num * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const T* head_cache = cache_data + task % heads * head_stride;
        const int64_t* request_slots = slot + task / heads * positions;
        T* k_row = key_out + task * length * head_dim;  // this task's [length, head_dim]
        T* v_row = value_out + task * length * head_dim;
        for (int64_t j = 0; j < positions;) {
          const int64_t s = request_slots[j];
          if (s < 0) {
            std::fill(k_row + j * head_dim, k_row + (j + 1) * head_dim, T(0));
            std::fill(v_row + j * head_dim, v_row + (j + 1) * head_dim, T(0));
            ++j;
            continue;
          }
          // A run of consecutive slots in one block: its keys are one [head_dim, run] tile of
          // the block's [head_dim, block_size] keys, read row by row (contiguous) and written
          // transposed; its values are one contiguous [run, head_dim] copy.
          const int64_t offset = s % block_size;
          int64_t run = 1;
          while (j + run < positions && offset + run < block_size &&
                 request_slots[j + run] == s + run) {
            ++run;
          }
          const T* block = head_cache + (s / block_size) * block_stride;
          T* keys_at = k_row + j * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) {
            const T* key_dim = block + d * block_size + offset;
            for (int64_t t = 0; t < run; ++t) keys_at[t * head_dim + d] = key_dim[t];
          }
          std::copy_n(block + block_size * head_dim + offset * head_dim, run * head_dim,
                      v_row + j * head_dim);
          j += run;
        }
      }
    });
  });
}

std::string cpu_isa() { return active_isa(); }

void set_cpu_isa(const std::string& isa) {
  TORCH_CHECK(isa == "scalar" || (isa == "avx512" && avx512_supported()),
              "cpu isa must be 'scalar' or (on AVX-512 CPUs) 'avx512', got ", isa);
  active_isa() = isa;
}

}  // namespace

at::Tensor emulated_cuda_sample(const at::Tensor& logits, const at::Tensor& temperature,
                                const at::Tensor& top_k, const at::Tensor& top_p,
                                const at::Tensor& min_p, const at::Tensor& u,
                                int64_t threads_per_block);

TORCH_LIBRARY(vllm_ptp, m) {
  m.def("uniforms(Tensor seeds, Tensor positions) -> Tensor");
  m.def("write_u_embeddings(Tensor(a!) out, int first_slot, Tensor weight, Tensor greedy_vector, "
        "Tensor seeds, Tensor positions, Tensor greedy) -> ()");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
        "Tensor u) -> Tensor");
  m.def("sample_and_verify(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
        "Tensor min_p, Tensor u, Tensor draft_tokens, Tensor num_drafts) -> (Tensor, Tensor)");
  m.def("paged_slots(Tensor block_table, Tensor batch_index, Tensor start, int num_positions, "
        "int block_size) -> Tensor");
  m.def("gather_paged_kv(Tensor cache, Tensor slots, Tensor(a!) keys, Tensor(b!) values) -> ()");
  // Test hooks: the CUDA kernel's block algorithm run on the host; the CPU ISA in use.
  m.def("emulated_cuda_sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
        "Tensor min_p, Tensor u, int threads_per_block) -> Tensor");
  m.def("cpu_isa", &cpu_isa);
  m.def("set_cpu_isa", &set_cpu_isa);
}

TORCH_LIBRARY_IMPL(vllm_ptp, CPU, m) {
  m.impl("uniforms", &uniforms);
  m.impl("write_u_embeddings", &write_u_embeddings);
  m.impl("sample", &sample);
  m.impl("sample_and_verify", &sample_and_verify);
  m.impl("paged_slots", &paged_slots);
  m.impl("gather_paged_kv", &gather_paged_kv);
  m.impl("emulated_cuda_sample", &emulated_cuda_sample);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
