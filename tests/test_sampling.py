"""The inverse-CDF sampler and coupled verification against brute-force references."""

import pytest
import torch

from tests.sampling_rows import rows_of
from vllm_ptp import sampling


def brute_force_sample(logits_row, temperature, top_k, top_p, min_p, u) -> int:
    """Token-by-token reference: transform, then walk the CDF in token-id order."""
    vocab = len(logits_row)
    probs = torch.softmax(logits_row.double() / temperature, dim=-1).tolist()
    top = max(probs)
    allowed = [p >= min_p * top for p in probs]
    ranked = sorted(range(vocab), key=lambda i: (-probs[i] * allowed[i], i))
    if 0 < top_k < vocab:
        for i in ranked[top_k:]:
            allowed[i] = False
    if top_p < 1.0:
        kept_mass = sum(p for p, a in zip(probs, allowed) if a)
        mass = 0.0
        for rank, i in enumerate(ranked):
            if not allowed[i]:
                continue
            if rank > 0 and mass >= top_p * kept_mass:
                allowed[i] = False
            mass += probs[i]
    weights = [p if a else 0.0 for p, a in zip(probs, allowed)]
    threshold = u * sum(weights)
    cumulative = 0.0
    for token, w in enumerate(weights):
        cumulative += w
        if cumulative > threshold:
            return token
    return max(t for t, w in enumerate(weights) if w > 0)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.95, 0.0), (1.3, 5, 1.0, 0.0), (0.5, 20, 0.8, 0.0),
     (1.0, 1, 1.0, 0.0), (1.0, 0, 0.05, 0.0), (0.9, 0, 1.0, 0.1)],
)
@pytest.mark.parametrize("vocab", [7, 111, 1000])
def test_sample_matches_brute_force(temperature, top_k, top_p, min_p, vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(64, vocab) * 3
    rows = rows_of(64, temperature, top_k, top_p, min_p)
    tokens = sampling.sample(logits, rows)
    expected = [
        brute_force_sample(logits[i], temperature, top_k, top_p, min_p, float(rows.u[i]))
        for i in range(64)
    ]
    assert tokens.tolist() == expected


def test_greedy_rows_take_the_argmax_whatever_u():
    logits = torch.randn(16, 50)
    tokens = sampling.sample(logits, rows_of(16, temperature=0.0))
    assert torch.equal(tokens, logits.argmax(-1))


def test_u_edges_zero_probability_and_masked_tokens():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]] * 3)
    u = torch.tensor([0.0, 0.5 - 1e-7, 1.0 - 2**-24])
    tokens = sampling.sample(logits, rows_of(3, u=u))
    # -inf tokens are never drawn; u=0 takes the first allowed token, u->1 the last.
    assert tokens.tolist() == [1, 1, 3]


def test_ties_at_cdf_boundary_go_to_the_next_token():
    logits = torch.zeros(1, 4)  # uniform: CDF boundaries at 0.25, 0.5, 0.75
    for u, token in [(0.25, 1), (0.5, 2), (0.75, 3), (0.2499, 0)]:
        assert sampling.sample(logits, rows_of(1, u=torch.tensor([u]))).item() == token


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4])
    n = 200_000
    logits = probs.log().expand(n, -1)
    tokens = sampling.sample(logits, rows_of(n))
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs.double(), atol=0.004)


def test_coupled_verify_accepts_the_longest_matching_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3], [4, 4, 4]])
    num_drafts = torch.tensor([3, 3, 3, 1])
    targets = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [0, 2, 3, 4], [4, 9, 9, 9]])
    output, accepted = sampling.coupled_verify(drafts, num_drafts, targets)
    assert accepted.tolist() == [3, 1, 0, 1]
    assert output.tolist() == [[5, 6, 7, 8], [5, 6, -1, -1], [0, -1, -1, -1], [4, 9, -1, -1]]


def test_coupled_verify_with_no_drafts_emits_one_token():
    output, accepted = sampling.coupled_verify(
        torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 0]), torch.tensor([[3], [4]])
    )
    assert accepted.tolist() == [0, 0] and output.tolist() == [[3], [4]]
