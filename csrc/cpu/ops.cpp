// CPU kernels of the PTP auxiliary-variable path, registered as torch ops (namespace vllm_ptp).
// The SIMD kernels have an AVX-512 and an AVX2 version (avx512.h, avx2.h), chosen at run time,
// and a scalar fallback here; the vocabulary passes compute exactly the values of ptp_kernels.h
// in all three, so the choice never changes a token.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../op_checks.h"
#include "avx2.h"
#include "avx512.h"

namespace {

using ptp::RowParams;
using ptp::SamplingParams;
using ptp::dispatch_float;
using ptp::cpu::kBlock;
using ptp::cpu::PanelUpdate;
namespace avx2 = ptp::cpu::avx2;
namespace avx512 = ptp::cpu::avx512;

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

// ---- dispatch -----------------------------------------------------------------------------------

enum class Isa { kScalar, kAvx2, kAvx512 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

bool supported(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default:
      return true;
  }
}

std::optional<Isa> isa_named(const std::string& name) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (name == kIsaNames[static_cast<int>(isa)]) return isa;
  }
  return std::nullopt;
}

// `name` as an ISA this CPU supports, or a clear error.
Isa supported_isa(const std::string& name) {
  const std::optional<Isa> isa = isa_named(name);
  TORCH_CHECK(isa, "CPU ISA must be 'scalar', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(supported(*isa), "this CPU does not support the ", name, " kernels");
  return *isa;
}

// The widest ISA the CPU supports; VLLM_PTP_CPU_ISA (e.g. scalar) picks a narrower one.
Isa& active_isa() {
  static Isa isa = [] {
    if (const char* forced = std::getenv("VLLM_PTP_CPU_ISA")) return supported_isa(forced);
    return supported(Isa::kAvx512) ? Isa::kAvx512
           : supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
  }();
  return isa;
}

template <typename T>
struct RowKernels {
  float (*row_max)(const T*, int64_t);
  int64_t (*first_equal)(const T*, int64_t, float);
  int64_t (*weights)(const T*, int64_t, const RowParams&, int64_t*, int64_t*);

  static RowKernels get() {
    switch (active_isa()) {
      case Isa::kAvx512: return {avx512::row_max<T>, avx512::first_equal<T>, avx512::weights<T>};
      case Isa::kAvx2: return {avx2::row_max<T>, avx2::first_equal<T>, avx2::weights<T>};
      default: return {row_max_scalar<T>, first_equal_scalar<T>, weights_scalar<T>};
    }
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

// ---- gated LoRA expand ---------------------------------------------------------------------------

// y_i[0..n) += sum_r a_i[r] * b[r * ldb + 0..n) for rows i < R: low-rank updates of R rows
// over a run of columns.
template <int R>
void rank_update_scalar(const float* const* a, int64_t rank, const float* b, int64_t ldb,
                        float* const* y, int64_t n) {
  for (int i = 0; i < R; ++i) {
    for (int64_t r = 0; r < rank; ++r) {
      for (int64_t c = 0; c < n; ++c) y[i][c] += a[i][r] * b[r * ldb + c];
    }
  }
}

// The rank updates of 1 to 4 rows (index rows - 1), per ISA (indexed by Isa).
using RankUpdate = void (*)(const float* const*, int64_t, const float*, int64_t, float* const*,
                            int64_t);
constexpr RankUpdate kRankUpdates[][4] = {
    {rank_update_scalar<1>, rank_update_scalar<2>, rank_update_scalar<3>, rank_update_scalar<4>},
    {avx2::rank_update<1>, avx2::rank_update<2>, avx2::rank_update<3>, avx2::rank_update<4>},
    {avx512::rank_update<1>, avx512::rank_update<2>, avx512::rank_update<3>,
     avx512::rank_update<4>}};

template <typename T>
void to_float_scalar(const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

template <typename T>
auto to_float_kernel(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::to_float<T>;
    case Isa::kAvx2: return avx2::to_float<T>;
    default: return to_float_scalar<T>;
  }
}

constexpr int64_t kExpandTile = 256;  // output columns per task: a B tile stays in L1

// out = stacked[:, :out_features] + ((stacked[:, out_features:] * gate) @ B^T), in float32, for
// the output of a compact GEMM over [W; A] (models/quantized.py). stacked [M, out_features + R]
// (float32 or bfloat16), gate [M] (nonzero: adapters on), lora_Bs_t[p] [ranks_p, columns_p]
// float32, the B^T of the projection at output columns columns[p] and
// low-rank columns ranks[p] of A x. One call replaces the dtype cast, the gate product and one
// addmm per projection.
at::Tensor gated_lora_expand(const at::Tensor& stacked, const at::Tensor& gate,
                             const std::vector<at::Tensor>& lora_Bs_t,
                             const std::vector<int64_t>& columns,
                             const std::vector<int64_t>& ranks, int64_t out_features) {
  TORCH_CHECK(stacked.dim() == 2 && stacked.stride(1) == 1 && stacked.device().is_cpu(),
              "stacked must be a CPU [rows, out_features + rank] tensor, rows contiguous");
  const int64_t rows = stacked.size(0), total_rank = stacked.size(1) - out_features;
  TORCH_CHECK(out_features >= 0 && total_rank >= 0, "out_features larger than stacked");
  TORCH_CHECK(gate.numel() == rows && gate.scalar_type() == at::kFloat && gate.is_contiguous(),
              "gate must be contiguous float32 [rows]");
  TORCH_CHECK(lora_Bs_t.size() == columns.size() && columns.size() == ranks.size(),
              "one column and one rank offset per B");
  for (size_t p = 0; p < lora_Bs_t.size(); ++p) {
    const at::Tensor& b = lora_Bs_t[p];
    TORCH_CHECK(b.dim() == 2 && b.is_contiguous() && b.scalar_type() == at::kFloat,
                "each B^T must be contiguous float32 [rank, columns]");
    TORCH_CHECK(columns[p] >= 0 && columns[p] + b.size(1) <= out_features && ranks[p] >= 0 &&
                ranks[p] + b.size(0) <= total_rank, "B ", p, " outside the stacked output");
  }
  at::Tensor out = at::empty({rows, out_features}, stacked.options().dtype(at::kFloat));
  // Tasks: column tiles of every projection with a B, then of the columns no B touches.
  struct Tile { int64_t projection, begin, end; };
  std::vector<Tile> tiles;
  std::vector<bool> adapted(out_features, false);
  for (size_t p = 0; p < lora_Bs_t.size(); ++p) {
    const int64_t end = columns[p] + lora_Bs_t[p].size(1);
    for (int64_t c = columns[p]; c < end; c += kExpandTile) {
      tiles.push_back({static_cast<int64_t>(p), c, std::min(end, c + kExpandTile)});
    }
    TORCH_CHECK(std::none_of(adapted.begin() + columns[p], adapted.begin() + end,
                             [](bool a) { return a; }), "B ", p, "'s columns overlap another B's");
    std::fill(adapted.begin() + columns[p], adapted.begin() + end, true);
  }
  for (int64_t c = 0; c < out_features;) {
    if (adapted[c]) { ++c; continue; }
    int64_t end = c;
    while (end < out_features && !adapted[end] && end - c < kExpandTile) ++end;
    tiles.push_back({-1, c, end});
    c = end;
  }
  const float* g = gate.data_ptr<float>();
  float* y = out.data_ptr<float>();
  if (tiles.empty() || rows == 0) return out;
  const RankUpdate* rank_update = kRankUpdates[static_cast<int>(active_isa())];
  dispatch_float(stacked.scalar_type(), "stacked", [&](auto type) {
    using T = decltype(type);
    const T* x = stacked.data_ptr<T>();
    const int64_t x_stride = stacked.stride(0);
    const auto to_float = to_float_kernel<T>(active_isa());
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> a;  // the gated rows' low-rank inputs, rank floats per row
      std::vector<float*> y_rows;
      std::vector<const float*> a_rows;
      for (int64_t t = begin; t < end; ++t) {
        const Tile tile = tiles[t];
        const int64_t width = tile.end - tile.begin;
        for (int64_t m = 0; m < rows; ++m) {
          to_float(x + m * x_stride + tile.begin, y + m * out_features + tile.begin, width);
        }
        if (tile.projection < 0) continue;
        const at::Tensor& b = lora_Bs_t[tile.projection];
        const int64_t rank = b.size(0);
        a.resize(rows * rank);
        y_rows.clear();
        a_rows.clear();
        for (int64_t m = 0; m < rows; ++m) {
          if (g[m] == 0.0f) continue;
          const T* low = x + m * x_stride + out_features + ranks[tile.projection];
          float* a_m = a.data() + a_rows.size() * rank;
          for (int64_t r = 0; r < rank; ++r) a_m[r] = static_cast<float>(low[r]) * g[m];
          a_rows.push_back(a_m);
          y_rows.push_back(y + m * out_features + tile.begin);
        }
        const float* b_tile = b.data_ptr<float>() + (tile.begin - columns[tile.projection]);
        for (size_t i = 0; i < y_rows.size(); i += 4) {
          const size_t group = std::min<size_t>(4, y_rows.size() - i);
          rank_update[group - 1](a_rows.data() + i, rank, b_tile, b.size(1), y_rows.data() + i,
                                 width);
        }
      }
    });
  });
  return out;
}

// ---- compact weights GEMM (fp16 or int8 weights, float32 activations) ---------------------------

constexpr int64_t kPanel = 16;  // output columns per packed panel (one AVX-512 vector)
template <typename W>
using PanelGemmTile = void (*)(const float*, int64_t, const W*, const float*, int64_t,
                               const PanelUpdate&, float*, int64_t, int64_t);

// An ISA's panel_gemm_tile for 1 to max_rows rows (tiles[rows - 1]): as many as its vector
// registers hold 2 accumulators per row for: 16 ymm, 6 rows; 32 zmm, 9 rows (one thread,
// gate_up's shape, int8: 160 GFLOP/s at 9 rows; GCC spills the accumulators of 10 rows or more,
// 73 GFLOP/s).
template <typename W>
struct PanelGemmTiles {
  const PanelGemmTile<W>* tiles;
  int64_t max_rows;

  template <int... R>
  static constexpr std::array<PanelGemmTile<W>, sizeof...(R)> avx2(
      std::integer_sequence<int, R...>) {
    return {avx2::panel_gemm_tile<R + 1, W>...};
  }
  template <int... R>
  static constexpr std::array<PanelGemmTile<W>, sizeof...(R)> avx512(
      std::integer_sequence<int, R...>) {
    return {avx512::panel_gemm_tile<R + 1, W>...};
  }

  static PanelGemmTiles get() {
    static constexpr auto kAvx2 = avx2(std::make_integer_sequence<int, 6>());
    static constexpr auto kAvx512 = avx512(std::make_integer_sequence<int, 9>());
    if (active_isa() == Isa::kAvx512) return {kAvx512.data(), kAvx512.size()};
    return {kAvx2.data(), kAvx2.size()};
  }
};

// The gated low-rank update panel_gemm adds to its panels (ops.LoraPanels): per output panel a
// [width, 16] block of B^T and where its inputs start among the gated x A^T columns (-1: the
// panel has none).
struct LoraPanels {
  const float* xa;  // [rows, ld_xa], column 0 = A's first row
  int64_t ld_xa;
  const c10::Half* blocks;  // [panels, width, 16]
  const int64_t* offsets;  // [panels]
  int64_t width;
};

// The packed panels [first, end) of x W^T (+ `lora`): panel p's columns land at column
// (p - first) * 16 of y, cut at `width`. One task per panel, over the rows in groups of at most
// the ISA's tile rows, as even as can be (AVX2, 9 rows: 5 + 4, not 6 + 3, whose 3 would leave
// the FMA units waiting on latency).
template <typename W>
void panel_gemm(const float* x, int64_t rows, int64_t ldx, const W* packed, const float* scales,
                int64_t k_dim, int64_t first, int64_t end, float* y, int64_t ldy, int64_t width,
                const LoraPanels* lora) {
  const PanelGemmTiles<W> tiles = PanelGemmTiles<W>::get();
  const int64_t groups = (rows + tiles.max_rows - 1) / tiles.max_rows;
  const int64_t group_rows = groups ? (rows + groups - 1) / groups : 0;
  at::parallel_for(first, end, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t panel = begin; panel < stop; ++panel) {
      const int64_t column = (panel - first) * kPanel;
      const int64_t offset = lora ? lora->offsets[panel] : -1;
      for (int64_t r = 0; r < rows; r += group_rows) {
        PanelUpdate update;
        if (offset >= 0) {
          update = {lora->xa + r * lora->ld_xa + offset, lora->ld_xa,
                    lora->blocks + panel * lora->width * kPanel, lora->width};
        }
        tiles.tiles[std::min(group_rows, rows - r) - 1](
            x + r * ldx, ldx, packed + panel * k_dim * kPanel,
            scales ? scales + panel * kPanel : nullptr, k_dim, update, y + r * ldy + column, ldy,
            std::min(kPanel, width - column));
      }
    }
  });
}

// y = x W^T in float32 for float32 x [M, K] and W [N, K] packed in panels of 16 output columns,
// k-major ([ceil(N / 16), K, 16], zeros past N): fp16, or int8 with per-column `scales`
// [ceil(N / 16) * 16]. The drafter's compact GEMM on CPUs with AVX2 but no 16-bit GEMMs of
// their own, and at a few rows on AVX-512 CPUs, where a pass is bound by its weights' bytes:
// half (fp16) or a quarter (int8) of fp32's, with float32 activations.
// With `lora_b`, the packed rows after W's first N are a LoRA group's stacked A (zeros to the
// panel's end) and y also gets the gated update: y += ((x A^T) * gate) B^T, B^T as per-panel
// blocks lora_b [ceil(N / 16), width, 16] (fp16) over the x A^T columns from lora_offsets[p]
// (counted from A's first row; -1: none). x A^T is computed first; the update then runs in the
// GEMM's epilogue.
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed,
                        const std::optional<at::Tensor>& scales, int64_t out_features,
                        const std::optional<at::Tensor>& gate,
                        const std::optional<at::Tensor>& lora_b,
                        const std::optional<at::Tensor>& lora_offsets) {
  TORCH_CHECK(active_isa() != Isa::kScalar, "panel_linear needs AVX2 or AVX-512");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 &&
              x.device().is_cpu(), "x must be a float32 CPU [rows, in_features] tensor, rows "
              "contiguous");
  const int64_t rows = x.size(0), panels = packed.size(0);
  const int64_t out_panels = (out_features + kPanel - 1) / kPanel;
  const bool lora = lora_b.has_value();
  TORCH_CHECK(gate.has_value() == lora && lora_offsets.has_value() == lora,
              "gate, lora_b and lora_offsets come together");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
              packed.size(1) == x.size(1) && out_features > 0 &&
              (lora ? panels * kPanel > out_features : panels == out_panels),
              "packed must be contiguous [ceil(out_features / 16), in_features, 16] (with "
              "lora_b: [ceil((out_features + rank) / 16), ...])");
  const bool int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || packed.scalar_type() == at::kHalf, "packed weights must be fp16 or int8");
  TORCH_CHECK(int8 == scales.has_value(), "int8 weights need per-column scales, fp16 none");
  if (int8) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                scales->numel() == panels * kPanel, "scales must be float32 [ceil(N / 16) * 16]");
  }
  // The x A^T columns: the packed panels from the one holding column out_features on.
  const int64_t first_xa_panel = out_features / kPanel;
  const int64_t xa_width = (panels - first_xa_panel) * kPanel;
  const int64_t xa_offset = out_features - first_xa_panel * kPanel;
  if (lora) {
    TORCH_CHECK(gate->scalar_type() == at::kFloat && gate->is_contiguous() &&
                gate->numel() == rows, "gate must be contiguous float32 [rows]");
    TORCH_CHECK(lora_b->dim() == 3 && lora_b->size(0) == out_panels && lora_b->size(2) == kPanel &&
                lora_b->scalar_type() == at::kHalf && lora_b->is_contiguous(),
                "lora_b must be contiguous fp16 [ceil(out_features / 16), width, 16]");
    TORCH_CHECK(lora_offsets->scalar_type() == at::kLong && lora_offsets->is_contiguous() &&
                lora_offsets->numel() == out_panels, "lora_offsets must be int64 [panels]");
    const int64_t* offsets = lora_offsets->data_ptr<int64_t>();
    for (int64_t p = 0; p < out_panels; ++p) {
      TORCH_CHECK(offsets[p] == -1 || (offsets[p] >= 0 &&
                  xa_offset + offsets[p] + lora_b->size(1) <= xa_width),
                  "lora_offsets[", p, "] = ", offsets[p], " reads past the packed A rows");
    }
  }
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const auto run = [&](const auto* weights) {
    const float* column_scales = int8 ? scales->data_ptr<float>() : nullptr;
    if (!lora) {
      panel_gemm(x.data_ptr<float>(), rows, x.stride(0), weights, column_scales, x.size(1), 0,
                 panels, y.data_ptr<float>(), out_features, out_features, nullptr);
      return;
    }
    at::Tensor xa = at::empty({rows, xa_width}, x.options());
    float* xa_data = xa.data_ptr<float>();
    panel_gemm(x.data_ptr<float>(), rows, x.stride(0), weights, column_scales, x.size(1),
               first_xa_panel, panels, xa_data, xa_width, xa_width, nullptr);
    const float* g = gate->data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t c = 0; c < xa_width; ++c) xa_data[m * xa_width + c] *= g[m];
    }
    const LoraPanels update{xa_data + xa_offset, xa_width, lora_b->data_ptr<c10::Half>(),
                            lora_offsets->data_ptr<int64_t>(), lora_b->size(1)};
    panel_gemm(x.data_ptr<float>(), rows, x.stride(0), weights, column_scales, x.size(1), 0,
               out_panels, y.data_ptr<float>(), out_features, out_features, &update);
  };
  if (int8) {
    run(packed.data_ptr<int8_t>());
  } else {
    run(packed.data_ptr<c10::Half>());
  }
  return y;
}

// ---- drafter attention over the paged KV cache --------------------------------------------------

// One drafter pass's attention for request n and KV head h, straight from vLLM's paged CPU cache
// (no gathered copy): its G = heads / kv_heads query heads times Q rows attend the request's
// context_len cached positions and, causally, the pass's own Q rows (K/V in qkv). The SIMD
// primitives come from `Simd`: avx512::Attention<T> or avx2::Attention<T>.
template <typename T>
struct DraftAttention {
  const T* qkv;  // [N, Q, heads + 2 kv_heads, head_dim], q and k after RoPE
  const T* cache;  // [blocks, kv_heads, block_size, 2 * head_dim]
  const int64_t* slots;  // [N, L]
  const int64_t* context_lens;  // [N]
  T* out;  // [N, Q, heads, head_dim]
  int64_t q_rows, heads, kv_heads, head_dim, block_size, max_context;
  float scale;

  int64_t row_stride() const { return (heads + 2 * kv_heads) * head_dim; }
  const T* own_key(int64_t n, int64_t j, int64_t h) const {
    return qkv + (n * q_rows + j) * row_stride() + (heads + h) * head_dim;
  }
  const T* own_value(int64_t n, int64_t j, int64_t h) const {
    return own_key(n, j, h) + kv_heads * head_dim;
  }
  // Keys of cache slot s's block from s on ([head_dim, block_size], dimension-major) and its
  // value row ([head_dim]).
  const T* block_keys(int64_t s, int64_t h) const {
    return cache + ((s / block_size) * kv_heads + h) * 2 * block_size * head_dim + s % block_size;
  }
  const T* slot_value(int64_t s, int64_t h) const {
    return cache + ((s / block_size) * kv_heads + h) * 2 * block_size * head_dim +
           block_size * head_dim + (s % block_size) * head_dim;
  }

  // scores[r][0..run) = queries[r] . keys of a run of consecutive slots of one block, 8 rows
  // at a time, then the rest together.
  template <typename Simd>
  void score_run(const float* queries, int64_t num_rows, const T* keys, int64_t run,
                 float* scores, int64_t score_stride) const {
    int64_t r = 0;
    for (; r + 8 <= num_rows; r += 8) {
      Simd::template score_rows<8>(queries + r * head_dim, keys, run, head_dim, block_size,
                                   scores + r * score_stride, score_stride);
    }
    score_rest<Simd>(queries + r * head_dim, num_rows - r, keys, run, scores + r * score_stride,
                     score_stride);
  }

  // score_run's last num_rows < 8 rows in one pass over the keys, R accumulators at once: row by
  // row, each FMA would wait on the one before it (a task of 5 drafter rows has 7 such rows).
  template <typename Simd, int R = 7>
  void score_rest(const float* queries, int64_t num_rows, const T* keys, int64_t run,
                  float* scores, int64_t score_stride) const {
    if constexpr (R > 0) {
      if (num_rows == R) {
        Simd::template score_rows<R>(queries, keys, run, head_dim, block_size, scores,
                                     score_stride);
      } else {
        score_rest<Simd, R - 1>(queries, num_rows, keys, run, scores, score_stride);
      }
    }
  }

  // Rows [row_begin, row_end) of request n's KV head h, row r being query row r / G of head
  // h * G + r % G.
  template <typename Simd>
  void run(int64_t n, int64_t h, int64_t row_begin, int64_t row_end, std::vector<float>& buffer,
           std::vector<const T*>& values) const {
    const int64_t group_heads = heads / kv_heads, rows = row_end - row_begin;
    const int64_t context = context_lens[n], width = context + q_rows;
    buffer.resize(rows * head_dim * 2 + rows * width);
    float* queries = buffer.data();  // [rows, head_dim], scaled
    float* outputs = queries + rows * head_dim;  // [rows, head_dim]
    float* scores = outputs + rows * head_dim;  // [rows, context + Q], then probabilities
    auto query_row = [&](int64_t r) { return (row_begin + r) / group_heads; };
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t head = h * group_heads + (row_begin + r) % group_heads;
      const T* q = qkv + (n * q_rows + query_row(r)) * row_stride() + head * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        queries[r * head_dim + d] = static_cast<float>(q[d]) * scale;
      }
    }
    const int64_t* request_slots = slots + n * max_context;
    values.resize(width);
    // Context scores, a run of consecutive slots of one block at a time.
    for (int64_t j = 0; j < context;) {
      const int64_t s = request_slots[j];
      int64_t run = 1;
      if (s < 0) {  // past the block table: a zero key and value, as the gathered reference
        for (int64_t r = 0; r < rows; ++r) scores[r * width + j] = 0.0f;
        values[j] = nullptr;
      } else {
        while (j + run < context && s % block_size + run < block_size &&
               request_slots[j + run] == s + run) {
          ++run;
        }
        score_run<Simd>(queries, rows, block_keys(s, h), run, scores + j, width);
        for (int64_t t = 0; t < run; ++t) values[j + t] = slot_value(s + t, h);
      }
      j += run;
    }
    // Own rows: query row i sees rows 0..i of its sequence.
    for (int64_t j = 0; j < q_rows; ++j) values[context + j] = own_value(n, j, h);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < q_rows; ++j) {
        scores[r * width + context + j] = j <= query_row(r)
            ? Simd::dot(queries + r * head_dim, own_key(n, j, h), head_dim) : -INFINITY;
      }
    }
    // Softmax of each row, in place (exp(-inf) = 0 for the rows it may not see).
    std::vector<float> inverse_sum(rows);
    for (int64_t r = 0; r < rows; ++r) {
      inverse_sum[r] = 1.0f / Simd::softmax(scores + r * width, width);
    }
    // Probability-weighted values, 4 rows x Simd::kValueDims dimensions at a time.
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int group = static_cast<int>(std::min<int64_t>(4, rows - r0));
      const float* p[4];
      float* o[4];
      for (int i = 0; i < group; ++i) {
        p[i] = scores + (r0 + i) * width;
        o[i] = outputs + (r0 + i) * head_dim;
      }
      for (int64_t d0 = 0; d0 < head_dim; d0 += Simd::kValueDims) {
        const T* const* v = values.data();
        switch (group) {
          case 4: Simd::template weighted_values<4>(p, v, width, head_dim, d0, o); break;
          case 3: Simd::template weighted_values<3>(p, v, width, head_dim, d0, o); break;
          case 2: Simd::template weighted_values<2>(p, v, width, head_dim, d0, o); break;
          default: Simd::template weighted_values<1>(p, v, width, head_dim, d0, o); break;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t head = h * group_heads + (row_begin + r) % group_heads;
      T* o = out + ((n * q_rows + query_row(r)) * heads + head) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        o[d] = static_cast<T>(outputs[r * head_dim + d] * inverse_sum[r]);
      }
    }
  }
};

constexpr int64_t kAttentionRows = 8;  // query rows per attention task

// Every request of the pass. Tasks of up to kAttentionRows rows of one request and KV head:
// enough of them to keep every thread busy at batch 1 (each reads its head's context K/V again,
// from cache).
template <typename Simd, typename T>
void run_draft_attention(const DraftAttention<T>& attention, int64_t num) {
  const int64_t rows = attention.q_rows * (attention.heads / attention.kv_heads);
  const int64_t chunks = (rows + kAttentionRows - 1) / kAttentionRows;
  at::parallel_for(0, num * attention.kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer;
    std::vector<const T*> values;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, head = task / chunks % attention.kv_heads;
      attention.template run<Simd>(task / chunks / attention.kv_heads, head,
                                   chunk * kAttentionRows,
                                   std::min(rows, (chunk + 1) * kAttentionRows), buffer, values);
    }
  });
}

// The drafter's attention for one layer (see DraftAttention): qkv [N, Q, heads + 2 kv_heads,
// head_dim] -> [N, Q, heads, head_dim]. Row i of request n attends its first context_lens[n]
// cached positions (slots [N, >= max context_lens], as paged_slots gives them) and rows <= i.
// AVX-512 or AVX2: without them the caller gathers the context and uses torch's attention.
at::Tensor paged_draft_attention(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& cache,
                                 const at::Tensor& slots, const at::Tensor& context_lens,
                                 double scale) {
  TORCH_CHECK(active_isa() != Isa::kScalar, "paged_draft_attention needs AVX2 or AVX-512");
  TORCH_CHECK(cache.dim() == 4 && cache.size(3) % 2 == 0 && cache.is_contiguous() &&
              cache.device().is_cpu(), "cache must be a contiguous CPU tensor [blocks, kv_heads, "
              "block_size, 2 * head_dim]");
  const int64_t kv_heads = cache.size(1), block_size = cache.size(2), head_dim = cache.size(3) / 2;
  TORCH_CHECK(num_heads > 0 && num_heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(2) == num_heads + 2 * kv_heads &&
              qkv.size(3) == head_dim && qkv.is_contiguous() &&
              qkv.scalar_type() == cache.scalar_type(),
              "qkv must be contiguous [N, Q, heads + 2 kv_heads, head_dim] in the cache's dtype");
  const int64_t num = qkv.size(0), q_rows = qkv.size(1);
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == num && slots.scalar_type() == at::kLong &&
              slots.is_contiguous(), "slots must be contiguous int64 [N, L]");
  TORCH_CHECK(context_lens.numel() == num && context_lens.scalar_type() == at::kLong &&
              context_lens.is_contiguous(), "context_lens must be contiguous int64 [N]");
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t cache_slots = cache.size(0) * block_size;
  for (int64_t n = 0; n < num; ++n) {
    TORCH_CHECK(lens[n] >= 0 && lens[n] <= slots.size(1), "context_lens[", n, "] out of range");
    for (int64_t j = 0; j < lens[n]; ++j) {
      const int64_t s = slot[n * slots.size(1) + j];
      TORCH_CHECK(s >= -1 && s < cache_slots, "slot ", s, " outside the cache");
    }
  }
  at::Tensor out = at::empty({num, q_rows, num_heads, head_dim}, qkv.options());
  dispatch_float(cache.scalar_type(), "cache", [&](auto type) {
    using T = decltype(type);
    const DraftAttention<T> attention{
        qkv.data_ptr<T>(), cache.data_ptr<T>(), slot, lens, out.data_ptr<T>(), q_rows, num_heads,
        kv_heads, head_dim, block_size, slots.size(1), static_cast<float>(scale)};
    if (active_isa() == Isa::kAvx512) {
      run_draft_attention<avx512::Attention<T>>(attention, num);
    } else {
      run_draft_attention<avx2::Attention<T>>(attention, num);
    }
  });
  return out;
}

std::string cpu_isa() { return kIsaNames[static_cast<int>(active_isa())]; }

void set_cpu_isa(const std::string& isa) { active_isa() = supported_isa(isa); }

bool cpu_isa_supported(const std::string& name) {
  const std::optional<Isa> isa = isa_named(name);
  return isa && supported(*isa);
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
  m.def("paged_draft_attention(Tensor qkv, int num_heads, Tensor cache, Tensor slots, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor packed, Tensor? scales, int out_features, "
        "Tensor? gate=None, Tensor? lora_b=None, Tensor? lora_offsets=None) -> Tensor");
  m.def("gated_lora_expand(Tensor stacked, Tensor gate, Tensor[] lora_Bs_t, int[] columns, "
        "int[] ranks, int out_features) -> Tensor");
  // Test hooks: the CUDA kernel's block algorithm run on the host; the CPU ISA in use and
  // the ones this CPU supports.
  m.def("emulated_cuda_sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
        "Tensor min_p, Tensor u, int threads_per_block) -> Tensor");
  m.def("cpu_isa", &cpu_isa);
  m.def("set_cpu_isa", &set_cpu_isa);
  m.def("cpu_isa_supported", &cpu_isa_supported);
}

TORCH_LIBRARY_IMPL(vllm_ptp, CPU, m) {
  m.impl("uniforms", &uniforms);
  m.impl("write_u_embeddings", &write_u_embeddings);
  m.impl("sample", &sample);
  m.impl("sample_and_verify", &sample_and_verify);
  m.impl("paged_slots", &paged_slots);
  m.impl("gather_paged_kv", &gather_paged_kv);
  m.impl("gated_lora_expand", &gated_lora_expand);
  m.impl("panel_linear", &panel_linear);
  m.impl("paged_draft_attention", &paged_draft_attention);
  m.impl("emulated_cuda_sample", &emulated_cuda_sample);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
