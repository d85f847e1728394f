"""Inverse-CDF sampling and coupled verification: the pure-torch reference of every kernel.

A token is x = F^-1(u; p) with F the CDF over the vocabulary in token-id order, after the request's
sampling transform (temperature -> min-p -> top-k -> top-p, vLLM's order), built from exact
integer weights (see WEIGHT_SCALE). Greedy rows
(temperature ~ 0) take the argmax. Verification compares the drafts with the target's own
inverse-CDF samples under the same u, so every emitted token is an exact sample of the target.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_TEMPERATURE = 1e-5  # below this a row is greedy (vLLM's _SAMPLING_EPS)
PLACEHOLDER_TOKEN_ID = -1  # vLLM's marker for "no token" in sampled_token_ids


@dataclass
class SamplingRows:
    """Per-row sampling transform and uniforms; one row per logits row."""

    temperature: torch.Tensor  # [rows] float32; < GREEDY_TEMPERATURE means greedy
    top_k: torch.Tensor  # [rows] int64; <= 0 or >= vocab means off
    top_p: torch.Tensor  # [rows] float32; >= 1 means off
    min_p: torch.Tensor  # [rows] float32; <= 0 means off
    u: torch.Tensor  # [rows] float32 in [0, 1)

    @classmethod
    def greedy(cls, num_rows: int, device: torch.device | str = "cpu") -> "SamplingRows":
        zeros = torch.zeros(num_rows, device=device)
        return cls(zeros, zeros.long(), torch.ones(num_rows, device=device), zeros, zeros)

    @classmethod
    def of_requests(
        cls, params: Sequence, u: torch.Tensor, row_request: torch.Tensor | None = None
    ) -> "SamplingRows":
        """Rows of requests' vLLM SamplingParams, one per request, or expanded to one per row
        by `row_request` (each row's request index); `u` holds one uniform per row."""

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            values = torch.tensor([getattr(p, name) for p in params], dtype=dtype)
            return values if row_request is None else values[row_request]

        return cls(
            temperature=column("temperature", torch.float32),
            top_k=column("top_k", torch.int64),
            top_p=column("top_p", torch.float32),
            min_p=column("min_p", torch.float32),
            u=u,
        )


# The CDF is built from exact integer weights, floor(2^40 * exp((x - max x) / T)), so prefix sums,
# totals and the top-p mass do not depend on summation order and the compiled kernels (csrc/)
# reproduce every decision bit for bit. exp is a fixed sequence of float32 ops (Cody-Waite
# reduction + degree-6 Taylor polynomial, relative error ~1e-7) that csrc/ptp_kernels.h repeats
# op for op; tokens below 2^-40 of the top token weigh 0.
WEIGHT_SCALE = 2.0**40
MIN_EXPONENT = -64.0  # (x - max x) / T below this weighs 0 (and keeps 2^n a normal float)


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


_LOG2E, _LN2_HI, _LN2_LO = _f32(1.44269502), _f32(0.693359375), _f32(-0.000212194442)
_EXP_COEFFS = [_f32(c) for c in (0.00138888892, 0.00833333377, 0.0416666679, 0.166666672, 0.5,
                                 1.0, 1.0)]


def _exp_nonpositive(d: torch.Tensor) -> torch.Tensor:
    """exp(d) for float32 d in [MIN_EXPONENT, 0], one IEEE-rounded op at a time."""
    n = torch.round(d * _LOG2E)
    r = (d - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_COEFFS[0].expand_as(r)
    for coeff in _EXP_COEFFS[1:]:
        p = p * r + coeff
    pow2 = ((n.int() + 127) << 23).view(torch.float32)
    return p * pow2


def _weights(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """int64 weights after temperature and min-p (min-p: exp(d) >= min_p, the top token's is 1)."""
    inv_temperature = 1.0 / rows.temperature.clamp_min(GREEDY_TEMPERATURE)
    scaled = logits.float() * inv_temperature.unsqueeze(1)
    d = scaled - scaled.amax(dim=-1, keepdim=True)
    valid = d >= MIN_EXPONENT  # false for -inf and NaN
    e = _exp_nonpositive(torch.where(valid, d, 0.0))
    keep = valid & (e >= rows.min_p.unsqueeze(1))
    return torch.where(keep, (e * WEIGHT_SCALE).long(), 0)


def scaled_floor(x: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(x * total) exactly, and whether x * total was inexact; float32 x in [0, 1), int64
    total in [0, 2^63). x = mant * 2^-s (s >= 24) and total split at bit 24 keep every product
    within 63 bits (csrc/ptp_kernels.h: scaled_floor)."""
    bits = x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    exponent = (bits >> 23) & 0xFF
    normal = exponent != 0
    mant = (bits & 0x7FFFFF) | (normal.long() << 23)
    shift = (torch.where(normal, 150 - exponent, 149) - 24).clamp(0, 63)
    low = mant * (total & 0xFFFFFF)
    high = mant * (total >> 24) + (low >> 24)
    floor = high >> shift
    return floor, ((low & 0xFFFFFF) != 0) | (high - (floor << shift) != 0)


def transformed_probs(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Unnormalised probabilities after temperature, min-p, top-k and top-p, as the exact int64
    weights the CDF is built from; [rows, vocab]."""
    weights = _weights(logits, rows)
    vocab = logits.shape[-1]
    top_k_on = (rows.top_k > 0) & (rows.top_k < vocab)
    top_p_on = rows.top_p < 1.0
    if bool(top_k_on.any() | top_p_on.any()):
        weights = weights * _top_k_top_p_mask(weights, rows.top_k, rows.top_p, top_k_on, top_p_on)
    return weights


def _top_k_top_p_mask(
    weights: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    top_k_on: torch.Tensor,
    top_p_on: torch.Tensor,
) -> torch.Tensor:
    # Rank tokens by weight (stable: ties keep token-id order).
    sorted_weights, order = weights.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(weights.shape[-1], device=weights.device).unsqueeze(0)
    keep_sorted = ~top_k_on.unsqueeze(1) | (rank < top_k.unsqueeze(1))
    sorted_weights = sorted_weights * keep_sorted
    mass_before = sorted_weights.cumsum(dim=-1) - sorted_weights
    # Keep the smallest prefix whose mass reaches top_p: mass before a kept token is
    # < top_p * total, i.e. < ceil(top_p * total) (at least 1: the top token is always kept).
    floor, inexact = scaled_floor(top_p, sorted_weights.sum(dim=-1))
    bound = (floor + inexact.long()).clamp_min(1)
    keep_sorted &= ~top_p_on.unsqueeze(1) | (mass_before < bound.unsqueeze(1))
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F^-1(u): the first token whose prefix weight (token-id order) exceeds floor(u * total)."""
    cdf = weights.cumsum(dim=-1)
    threshold = scaled_floor(u, cdf[:, -1])[0].unsqueeze(1)
    tokens = torch.searchsorted(cdf, threshold, right=True).squeeze(1)
    return tokens.clamp_(max=weights.shape[-1] - 1)


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """One token per logits row: argmax for greedy rows (the first one), F^-1(u) otherwise;
    int64 [rows]."""
    greedy = logits.argmax(dim=-1)
    random_rows = rows.temperature >= GREEDY_TEMPERATURE
    if not bool(random_rows.any()):
        return greedy
    weights = transformed_probs(logits, rows)
    sampled = inverse_cdf(weights, rows.u)
    # Rows without any weight (all -inf or NaN logits) fall back to the argmax.
    return torch.where(random_rows & (weights.amax(dim=-1) > 0), sampled, greedy)


def coupled_verify(
    draft_tokens: torch.Tensor, num_drafts: torch.Tensor, target_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the longest prefix where draft == target, then emit the target's next token.

    draft_tokens: [batch, max_k] (padding ignored), num_drafts: [batch],
    target_tokens: [batch, max_k + 1], the target's samples at each draft position plus bonus.
    Returns output [batch, max_k + 1] (PLACEHOLDER_TOKEN_ID after the emitted tokens) and the
    number of accepted drafts per row.
    """
    max_k = draft_tokens.shape[1]
    position = torch.arange(max_k, device=draft_tokens.device).unsqueeze(0)
    match = (draft_tokens == target_tokens[:, :max_k]) & (position < num_drafts.unsqueeze(1))
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)
    emitted = torch.arange(max_k + 1, device=draft_tokens.device).unsqueeze(0)
    output = torch.where(
        emitted <= num_accepted.unsqueeze(1), target_tokens, PLACEHOLDER_TOKEN_ID
    )
    return output, num_accepted


def sample_and_verify(
    logits: torch.Tensor,
    rows: SamplingRows,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample every logits row, then coupled_verify. Rows are grouped per request: its
    num_drafts draft positions, then its bonus position (vLLM's layout)."""
    row_tokens = sample(logits, rows)
    rows_per_request = num_drafts + 1
    first_row = torch.cumsum(rows_per_request, 0) - rows_per_request
    offsets = torch.arange(draft_tokens.shape[1] + 1, device=logits.device)
    index = (first_row.unsqueeze(1) + offsets).clamp(max=max(logits.shape[0] - 1, 0))
    return coupled_verify(draft_tokens, num_drafts, row_tokens[index])
