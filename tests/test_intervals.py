import torch

from vllm_ptp import sampling
from vllm_ptp.sampling import SamplingRows
from vllm_ptp.train.intervals import cdf_intervals, draw_inside


def rows(n, temperature, top_k, top_p):
    return SamplingRows(
        torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p),
        torch.zeros(n), torch.zeros(n),
    )


def brute_force_interval(probs_row, token):
    total = float(probs_row.double().sum())
    left = float(probs_row[:token].double().sum()) / total
    return left, left + float(probs_row[token]) / total


def test_intervals_match_a_loop_and_u_maps_back_to_the_token():
    torch.manual_seed(0)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 0.95), (0.8, 10, 0.9)]:
        logits = torch.randn(200, 333) * 2
        logits[:, 5] = logits[:, 6]  # ties
        logits[:, 7] = float("-inf")  # zero-probability token
        r = rows(200, temperature, top_k, top_p)
        probs = sampling.transformed_probs(logits, r)
        # Observed tokens: sampled from the transformed distribution (never zero-probability).
        tokens = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1).squeeze(1)
        left, right = cdf_intervals(logits, tokens, r)
        for i in range(0, 200, 17):
            expected = brute_force_interval(probs[i], int(tokens[i]))
            assert abs(float(left[i]) - expected[0]) < 1e-5
            assert abs(float(right[i]) - expected[1]) < 1e-5
        for z in (torch.zeros(200), torch.rand(200), torch.ones(200)):
            u = draw_inside(left, right, z)
            assert ((u >= left) & (u < right)).all()
            r.u = u
            mapped = sampling.sample(logits, r)
            wide = (right - left) > 1e-4  # float32 rounding can only matter for tiny intervals
            assert torch.equal(mapped[wide], tokens[wide])
