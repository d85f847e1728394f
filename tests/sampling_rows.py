"""Per-row sampling settings for sampler tests: scalars are broadcast to every row."""

import torch

from vllm_ptp.sampling import SamplingRows


def rows_of(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, u=None) -> SamplingRows:
    """n rows; each setting is a scalar or a per-row tensor; u is random unless given."""

    def per_row(value, dtype):
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        return torch.full((n,), value, dtype=dtype)

    return SamplingRows(
        temperature=per_row(temperature, torch.float32),
        top_k=per_row(top_k, torch.int64),
        top_p=per_row(top_p, torch.float32),
        min_p=per_row(min_p, torch.float32),
        u=torch.rand(n) if u is None else per_row(u, torch.float32),
    )
