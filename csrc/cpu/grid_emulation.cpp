// The CUDA sampling kernel's block algorithm (ptp::block_sample_row) run on the host: one loop
// iteration per blockIdx.x, and a HostBlock whose "threads" run one after another. The CUDA
// build compiles the same header functions for the device; this drives their index, chunk and
// search logic in the CPU tests (no GPU is available to the project).
#include <torch/extension.h>

#include <vector>

#include "../ptp_kernels.h"

namespace {

class HostBlock {
 public:
  explicit HostBlock(int threads) : i64_(threads), f32_(threads) {}
  int size() const { return static_cast<int>(i64_.size()); }

  template <typename F>
  const int64_t* gather_i64(F f) {
    for (int t = 0; t < size(); ++t) i64_[t] = f(t);
    return i64_.data();
  }

  template <typename F>
  const float* gather_f32(F f) {
    for (int t = 0; t < size(); ++t) f32_[t] = f(t);
    return f32_.data();
  }

 private:
  std::vector<int64_t> i64_;
  std::vector<float> f32_;
};

}  // namespace

at::Tensor emulated_cuda_sample(const at::Tensor& logits, const at::Tensor& temperature,
                                const at::Tensor& top_k, const at::Tensor& top_p,
                                const at::Tensor& min_p, const at::Tensor& u,
                                int64_t threads_per_block) {
  TORCH_CHECK(logits.dim() == 2 && threads_per_block > 0, "logits [rows, vocab], threads > 0");
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const at::Tensor mp = min_p.contiguous(), uu = u.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  at::Tensor tokens = at::empty({rows}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ptp_emulate", [&] {
    HostBlock block(static_cast<int>(threads_per_block));
    for (int64_t row = 0; row < rows; ++row) {  // blockIdx.x
      const ptp::SamplingParams s{t[row].item<float>(), p[row].item<float>(),
                                  mp[row].item<float>(), uu[row].item<float>(),
                                  k[row].item<int64_t>()};
      tokens[row] = ptp::block_sample_row(block, x.data_ptr<scalar_t>() + row * vocab, vocab, s);
    }
  });
  return tokens;
}
