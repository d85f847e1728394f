// Host-side argument checks and dtype dispatch shared by the CPU and CUDA op wrappers.
#pragma once

#include <torch/extension.h>

#include "ptp_kernels.h"

namespace ptp {

// Calls fn(T{}) with T the C++ type of a float32, bfloat16 or float16 tensor.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* what, Fn fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Checks the logits rows and their sampling settings (all on `device`); returns their pointers.
inline SamplingRows check_rows(at::DeviceType device, const at::Tensor& logits,
                               const at::Tensor& temperature, const at::Tensor& top_k,
                               const at::Tensor& top_p, const at::Tensor& min_p,
                               const at::Tensor& u) {
  TORCH_CHECK(logits.device().type() == device && logits.dim() == 2 && logits.stride(1) == 1,
              "logits must be a ", device, " [rows, vocab] tensor, rows contiguous");
  TORCH_CHECK(logits.size(1) < kMaxVocab, "vocab must be < 2^23");
  const int64_t rows = logits.size(0);
  for (const at::Tensor* t : {&temperature, &top_p, &min_p, &u}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows,
                "temperature, top_p, min_p and u must be contiguous float32 [rows]");
  }
  TORCH_CHECK(top_k.scalar_type() == at::kLong && top_k.is_contiguous() && top_k.numel() == rows,
              "top_k must be contiguous int64 [rows]");
  return {temperature.data_ptr<float>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
          u.data_ptr<float>(), top_k.data_ptr<int64_t>()};
}

inline void check_drafts(const at::Tensor& draft_tokens, const at::Tensor& num_drafts) {
  TORCH_CHECK(draft_tokens.dim() == 2 && draft_tokens.scalar_type() == at::kLong &&
              draft_tokens.is_contiguous(), "draft_tokens must be contiguous int64 [batch, k]");
  TORCH_CHECK(num_drafts.scalar_type() == at::kLong && num_drafts.is_contiguous() &&
              num_drafts.numel() == draft_tokens.size(0), "num_drafts must be int64 [batch]");
}

}  // namespace ptp
