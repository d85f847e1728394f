"""Inverse-CDF sampling and coupled verification: the pure-torch reference of every kernel.

A token is x = F^-1(u; p) with F the CDF over the vocabulary in token-id order, after the request's
sampling transform (temperature -> min-p -> top-k -> top-p, vLLM's order). Greedy rows
(temperature ~ 0) take the argmax. Verification compares the drafts with the target's own
inverse-CDF samples under the same u, so every emitted token is an exact sample of the target.
"""

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


def transformed_probs(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Unnormalised probabilities after temperature, min-p, top-k and top-p; [rows, vocab]."""
    temperature = rows.temperature.clamp_min(GREEDY_TEMPERATURE).unsqueeze(1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    keep = probs >= rows.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    vocab = logits.shape[-1]
    top_k_on = (rows.top_k > 0) & (rows.top_k < vocab)
    top_p_on = rows.top_p < 1.0
    if bool(top_k_on.any() | top_p_on.any()):
        keep &= _top_k_top_p_mask(probs * keep, rows.top_k, rows.top_p, top_k_on, top_p_on)
    return probs * keep


def _top_k_top_p_mask(
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    top_k_on: torch.Tensor,
    top_p_on: torch.Tensor,
) -> torch.Tensor:
    # Rank tokens by probability (stable: ties keep token-id order).
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
    keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    keep_sorted &= ~top_k_on.unsqueeze(1) | (rank < top_k.unsqueeze(1))
    sorted_probs = sorted_probs * keep_sorted
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    total = sorted_probs.sum(dim=-1, keepdim=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    in_nucleus = (mass_before < top_p.unsqueeze(1) * total) | (rank == 0)
    keep_sorted &= ~top_p_on.unsqueeze(1) | in_nucleus
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F^-1(u): the first token whose CDF (token-id order) exceeds u * total mass."""
    cdf = probs.cumsum(dim=-1)
    threshold = (u * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, threshold, right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """One token per logits row: argmax for greedy rows, F^-1(u) otherwise; int64 [rows]."""
    greedy = logits.argmax(dim=-1)
    random_rows = rows.temperature >= GREEDY_TEMPERATURE
    if not bool(random_rows.any()):
        return greedy
    sampled = inverse_cdf(transformed_probs(logits, rows), rows.u)
    return torch.where(random_rows, sampled, greedy)


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
