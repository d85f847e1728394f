"""CDF intervals of observed tokens, and uniforms drawn inside them (the PTP training signal).

Token x is F^-1(u) exactly when u lies in [F(x-1), F(x)) of the transformed distribution in
token-id order. Training draws u inside that interval and asks the drafter to output x from u.
The exact int64 prefix sums are the ones `sampling.inverse_cdf` uses, so u maps back to x.
"""

import torch

from vllm_ptp.sampling import SamplingRows, transformed_probs

# z in (EDGE, 1 - EDGE): keeps float32 rounding from pushing u across an interval edge.
EDGE = 1e-3


def cdf_intervals(
    logits: torch.Tensor, tokens: torch.Tensor, rows: SamplingRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """[left, right) of each token's CDF interval, normalised to [0, 1]; [rows] each."""
    probs = transformed_probs(logits, rows)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    right = cdf.gather(1, tokens[:, None]).squeeze(1)
    left = right - probs.gather(1, tokens[:, None]).squeeze(1)
    return left / total, right / total


def draw_inside(
    left: torch.Tensor, right: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """u = left + z * (right - left), with z kept off the edges."""
    return left + z.clamp(EDGE, 1 - EDGE) * (right - left)
