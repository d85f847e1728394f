// CUDA kernels of the PTP ops: the CUDA implementations of the schemas csrc/cpu/ops.cpp defines
// (load vllm_ptp._C first). The arithmetic is ptp_kernels.h's, built with --fmad=false, so the
// kernels give the CPU kernels' and the torch reference's values. Compiled and linked for sm_80
// and sm_90 in CI; never run on a GPU by this project (none is available). The block algorithm of
// the sampling kernel runs on the host in tests/test_ops.py (csrc/cpu/grid_emulation.cpp).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "../op_checks.h"

namespace {

constexpr int kThreads = 256;

// ptp_kernels.h's Block on the device: the exchange goes through shared memory.
class CudaBlock {
 public:
  __device__ CudaBlock(int64_t* i64, float* f32) : i64_(i64), f32_(f32) {}
  __device__ int size() const { return blockDim.x; }

  template <typename F>
  __device__ const int64_t* gather_i64(F f) {
    __syncthreads();  // earlier readers of the buffer are done
    i64_[threadIdx.x] = f(static_cast<int>(threadIdx.x));
    __syncthreads();
    return i64_;
  }

  template <typename F>
  __device__ const float* gather_f32(F f) {
    __syncthreads();
    f32_[threadIdx.x] = f(static_cast<int>(threadIdx.x));
    __syncthreads();
    return f32_;
  }

 private:
  int64_t* i64_;
  float* f32_;
};

template <typename T>
__global__ void sample_kernel(const T* logits, int64_t stride, int64_t vocab,
                              ptp::SamplingRows rows, int64_t* tokens) {
  __shared__ int64_t i64[kThreads];
  __shared__ float f32[kThreads];
  CudaBlock block(i64, f32);
  const int64_t row = blockIdx.x;
  const int64_t token = ptp::block_sample_row(block, logits + row * stride, vocab, rows[row]);
  if (threadIdx.x == 0) tokens[row] = token;
}

// One block per request: its rows in order, stopping at the first mismatch.
template <typename T>
__global__ void sample_and_verify_kernel(const T* logits, int64_t stride, int64_t vocab,
                                         ptp::SamplingRows rows, const int64_t* drafts,
                                         const int64_t* num_drafts, const int64_t* first_row,
                                         int64_t max_k, int64_t* output, int64_t* accepted) {
  __shared__ int64_t i64[kThreads];
  __shared__ float f32[kThreads];
  CudaBlock block(i64, f32);
  const int64_t b = blockIdx.x, first = first_row[b];
  // Every thread runs the same verification (sampling is collective); thread 0 writes.
  int64_t* out = threadIdx.x == 0 ? output + b * (max_k + 1) : nullptr;
  const int64_t n = ptp::verify_request(drafts + b * max_k, num_drafts[b], max_k, out,
                                        [&](int64_t j) {
    return ptp::block_sample_row(block, logits + (first + j) * stride, vocab, rows[first + j]);
  });
  if (threadIdx.x == 0) accepted[b] = n;
}

__global__ void uniforms_kernel(const int64_t* seeds, const int64_t* positions, float* u,
                                int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) u[i] = ptp::uniform(seeds[i], positions[i]);
}

// One block per (request, auxiliary slot); threads stride over the hidden size.
template <typename W, typename O>
__global__ void u_embedding_kernel(O* out, int64_t stride0, int64_t stride1, int64_t first_slot,
                                   int64_t steps, int64_t hidden, const W* weight,
                                   int64_t num_vectors, const W* greedy_vector,
                                   const int64_t* seeds, const int64_t* positions,
                                   const bool* greedy) {
  const int64_t i = blockIdx.x / steps, j = blockIdx.x % steps;
  O* row = out + i * stride0 + (first_slot + j) * stride1;
  const float u = greedy[i] ? ptp::kGreedyU : ptp::uniform(seeds[i], positions[i] + j);
  if (u < 0.0f || num_vectors == 1) {
    const W* src = u < 0.0f ? greedy_vector : weight;
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) row[h] = static_cast<O>(src[h]);
    return;
  }
  const ptp::Lerp l = ptp::lerp_of(u, num_vectors);
  const W *low = weight + l.lower * hidden, *high = weight + l.upper * hidden;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    const W v(ptp::lerp(static_cast<float>(low[h]), static_cast<float>(high[h]), l.frac));
    row[h] = static_cast<O>(v);
  }
}

__global__ void paged_slots_kernel(const int32_t* table, int64_t table_stride, int64_t num_blocks,
                                   const int64_t* batch_index, const int64_t* start,
                                   int64_t num, int64_t num_positions, int64_t block_size,
                                   int64_t* slots) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= num * num_positions) return;
  const int64_t i = k / num_positions, j = k % num_positions;
  slots[k] = ptp::paged_slot(table + batch_index[i] * table_stride, num_blocks, block_size,
                             start[i] + j);
}

// ---- host side ----------------------------------------------------------------------------------

int64_t blocks_for(int64_t n, int threads) { return (n + threads - 1) / threads; }


at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& u) {
  const ptp::SamplingRows rows =
      ptp::check_rows(at::kCUDA, logits, temperature, top_k, top_p, min_p, u);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor tokens = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return tokens;
  ptp::dispatch_float(logits.scalar_type(), "logits", [&](auto type) {
    using T = decltype(type);
    sample_kernel<T><<<logits.size(0), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<T>(), logits.stride(0), logits.size(1), rows,
        tokens.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tokens;
}

std::tuple<at::Tensor, at::Tensor> sample_and_verify(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& u,
    const at::Tensor& draft_tokens, const at::Tensor& num_drafts) {
  const ptp::SamplingRows rows =
      ptp::check_rows(at::kCUDA, logits, temperature, top_k, top_p, min_p, u);
  ptp::check_drafts(draft_tokens, num_drafts);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = draft_tokens.size(0), max_k = draft_tokens.size(1);
  const at::Tensor rows_per_request = num_drafts + 1;
  const at::Tensor first_row = rows_per_request.cumsum(0) - rows_per_request;
  at::Tensor output = at::empty({batch, max_k + 1}, draft_tokens.options());
  at::Tensor accepted = at::empty({batch}, draft_tokens.options());
  if (batch == 0) return {output, accepted};
  ptp::dispatch_float(logits.scalar_type(), "logits", [&](auto type) {
    using T = decltype(type);
    sample_and_verify_kernel<T><<<batch, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<T>(), logits.stride(0), logits.size(1), rows,
        draft_tokens.data_ptr<int64_t>(), num_drafts.data_ptr<int64_t>(),
        first_row.data_ptr<int64_t>(), max_k, output.data_ptr<int64_t>(),
        accepted.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {output, accepted};
}

at::Tensor uniforms(const at::Tensor& seeds, const at::Tensor& positions) {
  TORCH_CHECK(seeds.sizes() == positions.sizes(), "seeds and positions must have one shape");
  const c10::cuda::CUDAGuard guard(seeds.device());
  const at::Tensor s = seeds.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous();
  at::Tensor u = at::empty(s.sizes(), s.options().dtype(at::kFloat));
  const int64_t n = s.numel();
  if (n == 0) return u;
  uniforms_kernel<<<blocks_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<int64_t>(), p.data_ptr<int64_t>(), u.data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return u;
}

void write_u_embeddings(const at::Tensor& out, int64_t first_slot, const at::Tensor& weight,
                        const at::Tensor& greedy_vector, const at::Tensor& seeds,
                        const at::Tensor& positions, const at::Tensor& greedy) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 3 && out.stride(2) == 1,
              "out must be a CUDA [N, slots, hidden] tensor");
  const int64_t num = out.size(0), hidden = out.size(2), steps = out.size(1) - first_slot;
  TORCH_CHECK(first_slot >= 0 && steps >= 0, "first_slot out of range");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden && weight.is_contiguous() &&
              greedy_vector.numel() == hidden && greedy_vector.is_contiguous() &&
              greedy_vector.scalar_type() == weight.scalar_type(),
              "weight [num_vectors, hidden] and greedy_vector [hidden] must be contiguous");
  TORCH_CHECK(seeds.numel() == num && positions.numel() == num && greedy.numel() == num &&
              greedy.scalar_type() == at::kBool, "seeds, positions, greedy must be [N]");
  if (num * steps == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor s = seeds.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous();
  const at::Tensor g = greedy.contiguous();
  ptp::dispatch_float(weight.scalar_type(), "u-embedding weight", [&](auto w_type) {
    ptp::dispatch_float(out.scalar_type(), "out", [&](auto o_type) {
      using W = decltype(w_type);
      using O = decltype(o_type);
      u_embedding_kernel<W, O><<<num * steps, 128, 0, c10::cuda::getCurrentCUDAStream()>>>(
          out.data_ptr<O>(), out.stride(0), out.stride(1), first_slot, steps, hidden,
          weight.data_ptr<W>(), weight.size(0), greedy_vector.data_ptr<W>(),
          s.data_ptr<int64_t>(), p.data_ptr<int64_t>(), g.data_ptr<bool>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paged_slots(const at::Tensor& block_table, const at::Tensor& batch_index,
                       const at::Tensor& start, int64_t num_positions, int64_t block_size) {
  TORCH_CHECK(block_table.is_cuda() && block_table.dim() == 2 &&
              block_table.scalar_type() == at::kInt && block_table.stride(1) == 1,
              "block_table must be a CUDA int32 [rows, blocks] tensor");
  TORCH_CHECK(batch_index.numel() == start.numel(), "batch_index and start must be [N]");
  TORCH_CHECK(block_size > 0 && num_positions >= 0, "bad block_size or num_positions");
  const c10::cuda::CUDAGuard guard(block_table.device());
  const at::Tensor idx = batch_index.to(at::kLong).contiguous();
  const at::Tensor st = start.to(at::kLong).contiguous();
  const int64_t num = idx.numel();
  at::Tensor slots = at::empty({num, num_positions}, idx.options());
  if (num * num_positions == 0) return slots;
  paged_slots_kernel<<<blocks_for(num * num_positions, kThreads), kThreads, 0,
                       c10::cuda::getCurrentCUDAStream()>>>(
      block_table.data_ptr<int32_t>(), block_table.stride(0), block_table.size(1),
      idx.data_ptr<int64_t>(), st.data_ptr<int64_t>(), num, num_positions, block_size,
      slots.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return slots;
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_ptp, CUDA, m) {
  m.impl("uniforms", &uniforms);
  m.impl("write_u_embeddings", &write_u_embeddings);
  m.impl("sample", &sample);
  m.impl("sample_and_verify", &sample_and_verify);
  m.impl("paged_slots", &paged_slots);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
